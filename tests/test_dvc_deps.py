"""What each DVC stage depends on, checked against the source: extraction on the store's format and extraction
versions (not on code, so that an edit that leaves the values alone leaves every store valid); teacher training
on every source file it imports (transitively); the other stages on the package and their stage file."""

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINES = ["dvc.yaml", *(str(p.relative_to(REPO)) for p in sorted((REPO / "studies").glob("*/dvc.yaml")))]
COMMANDS = {"train-teachers": "train_teachers", "extract-teachers": "extract_teachers",
            "train-student": "train_student", "evaluate": "evaluate", "report": "report",
            "groups": None, "store": None}  # commands of cli.py itself, without a stage module


def module_file(name: str) -> Path | None:
    """pipeline.x.y -> its .py file (a package's __init__.py); None outside the project."""
    if name.split(".")[0] not in ("pipeline", "stages"):
        return None
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"


def imports(path: Path) -> set[Path]:
    """Project files `path` imports anywhere in it (functions included), but of cli.py only its
    module-level imports: each of its commands imports its own stage (and `store` its own helpers)."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in tree.body if path == REPO / "pipeline/cli.py" else ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # a package's __init__ runs on the way in
                file = module_file(".".join(parts[:i]))
                if file is not None and file.is_file():
                    found.add(file)
    return found


def closure(start: set[Path]) -> set[Path]:
    seen, todo = set(), set(start)
    while todo:
        path = todo.pop()
        seen.add(path)
        todo |= imports(path) - seen
    return seen


VERSIONS = {"pipeline/store/layout.py": ["VERSION", "EXTRACTION_VERSION"]}


def stages(command: str | None = None):
    for pipeline in PIPELINES:
        spec = yaml.safe_load((REPO / pipeline).read_text())
        for name, stage in spec["stages"].items():
            stage = stage.get("do", stage)
            found = re.search(r"pipeline ([a-z-]+)", stage["cmd"])[1]
            if command in (None, found):
                yield pytest.param(stage, COMMANDS[found], id=f"{pipeline}:{name}")


def code_deps(stage: dict) -> list[str]:
    return [d for d in stage["deps"] if d.split("/")[0] in ("pipeline", "stages")]


def imported(module: str) -> set[Path]:
    """Every project source file the stage's command imports (the package's __init__ files but the top one
    come with their folder)."""
    needed = closure({REPO / "pipeline/cli.py", REPO / "pipeline/__init__.py", REPO / f"stages/{module}.py"})
    return {p for p in needed if p.name != "__init__.py" or p.parent.name == "pipeline"} - {REPO / "stages/__init__.py"}


@pytest.mark.parametrize(("stage", "module"), list(stages("extract-teachers")))
def test_extraction_depends_on_the_versions_of_the_store_not_on_code(stage, module):
    assert code_deps(stage) == []
    versions = [p for p in stage["params"] if isinstance(p, dict) and "pipeline/store/layout.py" in p]
    assert versions == [VERSIONS]


def test_dvc_reads_the_versions_as_params():
    from dvc.utils.serialize import load_py

    from pipeline.store.layout import EXTRACTION_VERSION, VERSION

    read = load_py(REPO / "pipeline/store/layout.py")
    assert {name: read.get(name) for name in VERSIONS["pipeline/store/layout.py"]} == \
        {"VERSION": VERSION, "EXTRACTION_VERSION": EXTRACTION_VERSION}


@pytest.mark.parametrize(("stage", "module"), list(stages("train-teachers")))
def test_teacher_training_depends_on_every_source_file_it_imports(stage, module):
    deps = [REPO / d for d in code_deps(stage)]
    missing = sorted(str(p.relative_to(REPO)) for p in imported(module)
                     if not any(p == d or d in p.parents for d in deps))
    assert not missing, f"imported but not in deps: {', '.join(missing)}"
    assert REPO / "pipeline/extraction.py" not in imported(module)  # an extraction edit reruns no teacher training


@pytest.mark.parametrize(("stage", "module"), [p for c in ("train-student", "evaluate", "report") for p in stages(c)])
def test_the_other_stages_depend_on_the_package_and_their_stage(stage, module):
    assert code_deps(stage) == ["pipeline", f"stages/{module}.py"]
    assert {p.relative_to(REPO).parts[0] for p in imported(module)} | {"stages"} == {"pipeline", "stages"}
    assert {p for p in imported(module) if p.parts[-2] == "stages"} == {REPO / f"stages/{module}.py"}


@pytest.mark.parametrize(("stage", "module"), [p for c in ("groups", "store") for p in stages(c)])
def test_the_commands_without_a_stage_depend_on_the_package(stage, module):
    assert code_deps(stage) == ["pipeline"]


def outs(stage: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_what_reads_the_students_depends_on_every_students_checkpoint(pipeline):
    """evaluate and report read every student of their pipeline: a student rerun must rerun them (a dry run, as
    tests/test_dvc.py's, cannot show it)."""
    found = {name: stage.get("do", stage) for name, stage in yaml.safe_load((REPO / pipeline).read_text())["stages"].items()}
    students = [out.split("${")[0] for stage in found.values() if "pipeline train-student" in stage["cmd"]
                for out in outs(stage) if out.endswith("checkpoint.pt")]
    readers = [stage for stage in found.values() if re.search(r"pipeline (evaluate|report)\b", stage["cmd"])]
    assert students and readers
    for reader in readers:
        for prefix in students:
            assert any(prefix.startswith(dep.rstrip("/") + "/") for dep in reader["deps"]), (prefix, reader["deps"])


def test_byte_code_is_no_dependency():
    assert "__pycache__/" in (REPO / ".dvcignore").read_text().split()
