#!/usr/bin/env bash
# What needs a CUDA GPU, in one go (at most 8.5 minutes: its timeouts): the CUDA tests (explain-kd under
# the GPU's bf16 autocast, DDP over nccl, dask workers extracting on the GPU, nvJPEG stores training
# captured students, the exact resize on the GPU), then `pipeline bench --only gpu`: stage one's batch
# work, extraction from JPEG files end to end (--decode gpu and cpu, compute only), how far nvJPEG's
# pixels and bf16 move per-sample choices, and the student's step explain-kd / ce, uncaptured and
# captured. Every part runs; the exit status is non-zero when any failed.
# Usage: bash benchmarks/gpu_checks.sh OUT_FOLDER   (the logs and bench.json go there)
# (benchmarks/student_steps.py --device cuda --profile profiles the step per method; not run here)
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_checks.sh OUT_FOLDER}
mkdir -p "$out"
python3 -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'
print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
failed=0
timeout 100 python3 -m pytest -q -s -p no:cacheprovider -k "cuda or local_cluster or killed or gpu_gives" \
  tests/test_distill.py tests/test_ddp.py tests/test_cluster.py tests/test_device_views.py tests/test_resample.py \
  2>&1 | tee "$out/tests.log" || failed=1
timeout 400 python3 -m pipeline bench --only gpu --json "$out/bench.json" 2>&1 | tee "$out/bench.log" || failed=1
exit $failed
