"""`dvc repro` in a copy of the repository with tiny params: the whole chain runs, a second
repro runs nothing, and a student parameter reruns only student stages."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "train_teachers": {"teachers": ["resnet8_slim", "vgg8_bn"], "epochs": 1},
    "extract_teachers": {"teachers": ["data_cache/teachers/resnet8_slim.pt", "data_cache/teachers/vgg8_bn.pt"],
                         "block_size": 512},
    "methods": ["ce", "explain-kd"],
    "train_student": {"epochs": 1},
}


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.split()


def repro(workdir: Path) -> list[str]:
    """Run `dvc repro`; return the names of the stages it ran."""
    result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=workdir, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return re.findall(r"Running stage '([^']+)'", result.stdout)


@pytest.mark.slow
def test_dvc_repro_reruns_only_what_changed(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is needed for a DVC repository")
    for name in tracked_files():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section] = {**params[section], **values} if isinstance(values, dict) else values
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)

    first = repro(tmp_path)
    assert first == ["train_teachers", "extract_teachers", "train_student@ce", "train_student@explain-kd", "evaluate"]
    assert (tmp_path / "data_cache/metrics.json").is_file()
    assert repro(tmp_path) == []

    params["train_student"]["beta"] = 3.0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert repro(tmp_path) == ["train_student@ce", "train_student@explain-kd", "evaluate"]
