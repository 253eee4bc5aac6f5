"""How DVC handles a teacher store: files, and the seconds of `dvc add`, `dvc push` to a local
remote and `dvc pull` into a fresh clone, for stores of ILSVRC2012's shape (3 teachers, top-10
logits, 7x7 maps, 1 view; synthetic values) with as many blocks as ILSVRC2012's train split has at
a given block size. The file count depends on the block count alone (one shard file per array and
block); rows per block only change the bytes, so --rows keeps the run short.

    python benchmarks/dvc_remote.py --block-sizes 16384,1024 --rows 256
"""

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.bench import ILSVRC2012_TRAIN, bytes_under, synthetic_store


def timed(workdir: Path, *command: str) -> float:
    began = time.perf_counter()
    subprocess.run(list(command), cwd=workdir, check=True, capture_output=True)
    return time.perf_counter() - began


def files_under(root: Path) -> int:
    return sum(1 for path in root.rglob("*") if path.is_file())


def measure(folder: Path, blocks: int, rows: int) -> dict:
    repo, remote, clone = folder / "repo", folder / "remote", folder / "clone"
    repo.mkdir()
    dvc = [sys.executable, "-m", "dvc"]
    for command in (["git", "init", "-q"], [*dvc, "init", "-q"], [*dvc, "remote", "add", "-d", "shared", str(remote)]):
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    store = synthetic_store(repo / "store.zarr", blocks * rows, 1000, 7, rows, logits={"mode": "topk", "k": 10})
    files, size = files_under(store.location.path), bytes_under(store.location.path)
    add = timed(repo, *dvc, "add", "-q", "store.zarr")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@example.org", "commit", "-qm", "store"],
                   cwd=repo, check=True)
    push = timed(repo, *dvc, "push", "-q")
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    pull = timed(clone, *dvc, "pull", "-q")
    assert files_under(clone / "store.zarr") == files, "the pulled store differs from the pushed one"
    return {"files": files, "MB": size / 1e6, "add": add, "push": push, "pull": pull}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block-sizes", default="16384,1024", help="ILSVRC2012 block sizes whose block counts to use")
    parser.add_argument("--rows", type=int, default=256, help="rows per block of the synthetic store")
    args = parser.parse_args()
    print(f"| ILSVRC2012 block size | blocks | files | MB (at {args.rows} rows a block) | dvc add s | dvc push s | "
          "dvc pull s |\n|--:|--:|--:|--:|--:|--:|--:|")
    for block_size in map(int, args.block_sizes.split(",")):
        blocks = math.ceil(ILSVRC2012_TRAIN / block_size)
        with tempfile.TemporaryDirectory() as folder:
            got = measure(Path(folder), blocks, args.rows)
        print(f"| {block_size:,} | {blocks:,} | {got['files']:,} | {got['MB']:.1f} | {got['add']:.1f} | "
              f"{got['push']:.1f} | {got['pull']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
