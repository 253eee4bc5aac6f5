#!/usr/bin/env bash
# What needs a CUDA GPU, in one go: the CUDA tests (explain-kd under the GPU's bf16 autocast,
# DDP over nccl with the student's Grad-CAM double backward, dask workers extracting on the GPU),
# `pipeline bench`'s GPU figures with the student run ratios on the GPU, and the student step per
# method at several batch sizes with its profile (benchmarks/student_steps.py). Every part runs;
# the exit status is non-zero when any failed.
# Usage: bash benchmarks/gpu_checks.sh OUT_FOLDER   (the logs and bench.json go there)
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_checks.sh OUT_FOLDER}
mkdir -p "$out"
python3 -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'
print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
failed=0
timeout 200 python3 -m pytest -q -p no:cacheprovider -k "cuda or local_cluster or killed" \
  tests/test_distill.py tests/test_ddp.py tests/test_cluster.py 2>&1 | tee "$out/tests.log" || failed=1
timeout 300 python3 -m pipeline bench --only gpu --only student --repeats 3 --json "$out/bench.json" 2>&1 \
  | tee "$out/bench.log" || failed=1
timeout 300 python3 benchmarks/student_steps.py --device cuda --profile 2>&1 | tee "$out/steps.log" || failed=1
exit $failed
