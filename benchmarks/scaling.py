"""Both stages on one process against their scale-out: stage one with `--scheduler local:N`, stage
two under `torchrun --nproc_per_node N`; wall time of the same work.

Stage one extracts the embedded digits train split with the default pipeline's three teacher
architectures (untrained weights from pipeline.fabricate: the work per image does not depend
on them) into fresh stores; stage two trains an explain-kd student from one of those stores,
one process with batch B against N ranks of B / N each (the same steps on the same samples).
Every run is a fresh command (interpreter, cluster or rendezvous start included); the setups
take turns, and the tables print the median seconds of each and the speed-up over one process
(one run, one machine).

    python benchmarks/scaling.py --processes 2 --repeats 3
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.fabricate import make_teacher


def seconds(command: list[str], env: dict | None = None) -> float:
    began = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, **(env or {})})
    return time.perf_counter() - began


def table(title: str, runs: dict[str, list[float]]) -> None:
    base = statistics.median(next(iter(runs.values())))
    print(f"\n{title}\n| setup | seconds (range) | speed-up |\n|---|--:|--:|")
    for name, times in runs.items():
        median = statistics.median(times)
        print(f"| {name} | {median:.1f} ({min(times):.1f}-{max(times):.1f}) | {base / median:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    n, pipeline = args.processes, [sys.executable, "-m", "pipeline"]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        teachers = ",".join(str(make_teacher(folder / f"{arch}.pt", arch, seed=i))
                            for i, arch in enumerate(("resnet20", "wrn16_2", "vgg8_bn")))
        extract = [*pipeline, "extract-teachers", "--teachers", teachers, "--block-size", "64", "--device", "cpu",
                   "--views", str(args.views)]
        setups = {"one process": [], f"dask local:{n}": ["--scheduler", f"local:{n}"]}
        stage_one = {name: [] for name in setups}
        for turn in range(args.repeats):
            for name in list(setups)[turn % 2:] + list(setups)[:turn % 2]:
                store = folder / f"{name.split()[0]}-{turn}.zarr"
                stage_one[name].append(seconds([*extract, "--store", str(store), *setups[name]]))
        train = ["train-student", "--store", str(folder / "one-0.zarr"), "--method", "explain-kd", "--device", "cpu",
                 "--epochs", str(args.epochs),  # the recipe docs/scaling.md's figures were measured with:
                 "--policy", "per-sample", "--kd-source", "best", "--beta", "0.5"]
        commands = {
            "one process": ([*pipeline, *train, "--batch-size", str(args.batch_size)], None),
            f"torchrun {n} processes": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node", str(n), "-m", "pipeline", *train,
                                        "--batch-size", str(args.batch_size // n)], {"OMP_NUM_THREADS": str(
                                            max(1, (os.cpu_count() or 1) // n))}),
        }
        stage_two = {name: [] for name in commands}
        for turn in range(args.repeats):
            for name in list(commands)[turn % 2:] + list(commands)[:turn % 2]:
                command, env = commands[name]
                stage_two[name].append(seconds([*command, "--out-dir", str(folder / f"{name.split()[0]}-{turn}")], env))
    table(f"stage one: digits train split, 3 teachers, {args.views} view(s), blocks of 64, median of {args.repeats}",
          stage_one)
    table(f"stage two: explain-kd resnet8_slim, {args.epochs} epochs, global batch {args.batch_size}, "
          f"median of {args.repeats}", stage_two)


if __name__ == "__main__":
    main()
