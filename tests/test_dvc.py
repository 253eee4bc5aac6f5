"""`dvc repro` in a copy of the repository with tiny params: the whole chain runs, a second
repro runs nothing, a store pushed to a remote serves a fresh clone, and a student parameter reruns
only student stages; the same for the digits study's methods x seeds matrix, which reads the default
pipeline's store. A killed extraction resumes, and a data change reruns it."""

import json
import os
import re
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "train_teachers": {"teachers": ["resnet8_slim", "vgg8_bn"], "epochs": 1},
    "extract_teachers": {"teachers": ["data_cache/teachers/resnet8_slim.pt", "data_cache/teachers/vgg8_bn.pt"],
                         "block_size": 512},
    "methods": ["explain-kd"],  # one student: its store reads are the ones a pulled store must serve
    "train_student": {"epochs": 1},
}
TINY_STUDY = {
    "extract_teachers": {"teachers": TINY["extract_teachers"]["teachers"]},
    "train_student": {"epochs": 1},
    "report": {"explain_runs": ["ekd-b0.5-s1"], "comparisons": []},  # the study's comparisons name variants not run here
    "seeds": [0, 1],
}
TINY_VARIANTS = {  # a dot in a name, as the studies' b0.5, must not break DVC's params
    "ekd-b0.5": {"method": "explain-kd", "student_map": "attention", "kd_source": "best", "beta": 0.5}}


def tracked_files() -> list[str]:
    return run(REPO, "git", "ls-files").split()


def copy_repository(target_root: Path) -> None:
    """The tracked files of this repository, copied to `target_root` (skips without git)."""
    if shutil.which("git") is None:
        pytest.skip("git is needed for a DVC repository")
    for name in tracked_files():
        target = target_root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)


def run(workdir: Path, *command: str) -> str:
    """Run `command` in `workdir`; it must succeed; return what it printed."""
    result = subprocess.run(list(command), cwd=workdir, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def repro(workdir: Path, *targets: str) -> list[str]:
    """Run `dvc repro [targets]`; return the names of the stages it ran (with "--dry": would run)."""
    return re.findall(r"Running stage '([^']+)'", run(workdir, sys.executable, "-m", "dvc", "repro", *targets))


def shrink(path: Path, tiny: dict) -> dict:
    """Overwrite sections (or keys of sections) of a params file with tiny values; return the result."""
    params = yaml.safe_load(path.read_text())
    for section, values in tiny.items():
        params[section] = {**params[section], **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(params))
    return params


def assert_ran(ran: list[str], expected: list[str]) -> list[str]:
    """The expected stages ran, each once, the last one last (DVC orders independent stages, such
    as the students of one store, differently from run to run)."""
    assert sorted(ran) == sorted(expected) and ran[-1] == expected[-1]
    return ran


def dvc_json(workdir: Path, *command: str) -> dict:
    return json.loads(run(workdir, sys.executable, "-m", "dvc", *command, "--json"))


def commit(workdir: Path, message: str) -> None:
    run(workdir, "git", "add", "-A")
    run(workdir, "git", "-c", "user.name=test", "-c", "user.email=test@example.org", "commit", "-qm", message)


def check_a_pushed_store_trains_a_student_in_a_fresh_clone_without_extracting(origin: Path, clone: Path) -> None:
    remote, dvc = clone.parent / "remote", [sys.executable, "-m", "dvc"]
    run(origin, *dvc, "remote", "add", "--default", "shared", str(remote))  # S3 or SSH: the same, with a URL
    commit(origin, "store")
    run(origin, *dvc, "push", "--with-deps", "extract_teachers")  # the store and the teachers it was made from
    run(origin, "git", "clone", "-q", str(origin), str(clone))
    assert not (clone / "data_cache/stores/digits-train.zarr").exists()
    run(clone, *dvc, "pull", "--with-deps", "extract_teachers")
    store = clone / "data_cache/stores/digits-train.zarr"
    assert run(clone, "pipeline", "store", "verify", str(store)).startswith(f"OK {store}")  # arrived whole
    assert repro(clone, "train_student@explain-kd") == ["train_student@explain-kd"]  # no teachers, no extraction
    assert (clone / "data_cache/students/explain-kd/checkpoint.pt").is_file()


@pytest.mark.slow
def test_dvc_repro_reruns_only_what_changed_and_a_pushed_store_serves_a_fresh_clone(tmp_path):
    """One tiny repository (its teacher training and extraction are the slow part) for the whole story."""
    repo, clone = tmp_path / "origin", tmp_path / "clone"
    copy_repository(repo)
    params = shrink(repo / "params.yaml", TINY)
    study = shrink(repo / "studies/digits/params.yaml", TINY_STUDY)
    study["variants"] = TINY_VARIANTS  # replaced, not merged
    (repo / "studies/digits/params.yaml").write_text(yaml.safe_dump(study))
    run(repo, "git", "init", "-q")

    first = assert_ran(repro(repo), ["train_teachers", "extract_teachers", "train_student@explain-kd", "evaluate"])
    assert first[:2] == ["train_teachers", "extract_teachers"]
    assert (repo / "data_cache/metrics.json").is_file()
    assert repro(repo) == []
    check_a_pushed_store_trains_a_student_in_a_fresh_clone_without_extracting(repo, clone)

    # an edit that leaves the values alone, here a comment in the extraction code, leaves the store as it is:
    # its stage stays clean, and the extraction command, run again, finds every block done and writes nothing
    extraction = repo / "pipeline/extraction.py"
    code = extraction.read_text()
    extraction.write_text(code + "# a comment\n")
    assert dvc_json(repo, "status", "train_teachers", "extract_teachers") == {}
    store = repo / "data_cache/stores/digits-train.zarr"
    files = {path: path.stat().st_mtime_ns for path in store.rglob("*")}
    run(repo, "pipeline", "extract-teachers", "--params", "params.yaml", "--on-change", "replace")
    assert {path: path.stat().st_mtime_ns for path in store.rglob("*")} == files
    assert_ran(repro(repo, "--dry"), ["train_student@explain-kd", "evaluate"])  # students depend on `pipeline`
    extraction.write_text(code)
    assert dvc_json(repo, "status", "train_student@explain-kd", "evaluate") == {}  # the comment gone, clean again
    # while a raised extraction version is a change of the values: the extraction stage is stale
    layout = repo / "pipeline/store/layout.py"
    written = layout.read_text()
    layout.write_text(re.sub(r"^EXTRACTION_VERSION = (\d+)", lambda m: f"EXTRACTION_VERSION = {int(m[1]) + 1}", written,
                             flags=re.M))
    assert "extract_teachers" in dvc_json(repo, "status", "extract_teachers")
    layout.write_text(written)

    params["train_student"]["beta"] = 3.0  # a student parameter (the code as it was): students rerun, not teachers
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert repro(repo, "--dry") == ["train_student@explain-kd"]  # evaluate follows it (a dry run cannot tell)

    students = [f"studies/digits/dvc.yaml:students@ekd-b0.5-{seed}" for seed in (0, 1)]
    report, others = "studies/digits/dvc.yaml:report", ["studies/digits/dvc.yaml:extract_teachers",
                                                        "studies/digits/dvc.yaml:selection"]
    ran = repro(repo, "studies/digits/dvc.yaml")
    assert sorted(ran) == sorted(others + students + [report])  # the selection table may come before or after
    assert ran.index(report) > max(ran.index(student) for student in students)  # the report reads every student
    # the default teachers and store are reused; the selection table is of this repository's tiny teachers
    # (the copied repository holds the real study's table, of other teachers, until the stage rewrites it)
    selection = json.loads((repo / "reports/selection/digits-train.json").read_text())
    assert selection["teachers"] == ["resnet8_slim", "vgg8_bn"] and "per-sample" in selection["policies"]
    assert "share resnet8_slim" in (repo / "reports/selection/digits-train.txt").read_text()
    results = pd.read_csv(repo / "reports/digits/results.csv")
    assert list(results.variant) == ["ekd-b0.5"] and set(results.seeds) == {2}
    assert (repo / "reports/digits/explanations.png").is_file()
    # the report is a DVC metrics file: per variant its seeds, mean and std (and the difference to the
    # baseline, kd, which this grid does not run)
    metrics = dvc_json(repo, "metrics", "show")[""]["data"]["reports/metrics/digits.json"]["data"]
    for row in results.itertuples():
        assert metrics[row.variant] == {"seeds": 2, "test_mean": pytest.approx(row.test_mean, abs=1e-6),
                                        "test_std": pytest.approx(row.test_std, abs=1e-6)}
    # a variant is params: changing one shows as that param and reruns its students (in a grid of several
    # variants all students: DVC reads a dot in a name, b0.5, as a key separator, so the stages depend on
    # `variants` as a whole)
    commit(repo, "study")
    study["variants"]["ekd-b0.5"]["beta"] = 3.0
    (repo / "studies/digits/params.yaml").write_text(yaml.safe_dump(study))
    assert dvc_json(repo, "params", "diff")["studies/digits/params.yaml"] == {
        "variants.ekd-b0.5.beta": {"old": 0.5, "new": 3.0, "diff": 2.5}}
    # the students are stale and nothing else yet (a dry run cannot tell that the report will follow them)
    assert sorted(repro(repo, "--dry", "studies/digits/dvc.yaml")) == sorted(students)


def started_blocks(store: Path) -> int:
    """Blocks every teacher of `store` has finished (0 while the store is being created)."""
    import zarr

    try:
        teachers = zarr.open_group(store / "teachers", mode="r")
        done = [group["progress"][...] for _, group in teachers.groups()]
    except Exception:  # not created yet
        return 0
    return int(sum(all(d) for d in zip(*done))) if len(done) == 2 else 0


@pytest.mark.slow
def test_a_killed_dvc_repro_resumes_extraction_and_a_data_change_reruns_it(tmp_path):
    copy_repository(tmp_path)
    params = shrink(tmp_path / "params.yaml", {**TINY, "extract_teachers": {**TINY["extract_teachers"],
                                                                          "block_size": 32}})
    run(tmp_path, "git", "init", "-q")
    assert repro(tmp_path, "train_teachers") == ["train_teachers"]
    store = tmp_path / "data_cache/stores/digits-train.zarr"
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "extract_teachers"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while started_blocks(store) < 4 and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # dvc and the extraction it started
    process.wait()
    done = started_blocks(store)
    assert 4 <= done < 36, f"the kill should land mid-extraction; {done} of 36 blocks were finished"

    printed = run(tmp_path, sys.executable, "-m", "dvc", "repro", "extract_teachers")
    remaining = int(re.search(r"(\d+) of 36 blocks to extract", printed)[1])
    assert remaining <= 36 - done  # the finished blocks were kept
    assert started_blocks(store) == 36

    params["data"]["split_seed"] = 1  # other training samples: the store must be made anew
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    # DVC reruns the extraction (teachers first: they train on the split too), whose --on-change replace
    # recomputes every block (tests/test_store_integrity.py: on-change replace)
    assert repro(tmp_path, "--dry", "extract_teachers") == ["train_teachers", "extract_teachers"]


def test_dvc_reads_every_pipeline_and_the_extraction_versions_as_params():
    """The fast check of this module (the others run `dvc repro`): DVC itself parses the default pipeline and every
    study's, and reads the extraction stages' versions from pipeline/store/layout.py."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        stages = {stage.addressing: stage for stage in repo.index.stages}
    assert {"train_teachers", "extract_teachers", "evaluate", "studies/digits/dvc.yaml:report"} <= set(stages)
    versions = [dep for dep in stages["extract_teachers"].deps if str(dep).endswith("layout.py")]
    assert [sorted(dep.params) for dep in versions] == [["EXTRACTION_VERSION", "VERSION"]]
