"""Every DVC stage lists every source file its command imports (transitively), so that a code
change reruns exactly the stages it can affect; read from the source, not kept by hand."""

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINES = ["dvc.yaml", *(str(p.relative_to(REPO)) for p in sorted((REPO / "studies").glob("*/dvc.yaml")))]
COMMANDS = {"train-teachers": "train_teachers", "extract-teachers": "extract_teachers",
            "train-student": "train_student", "evaluate": "evaluate", "report": "report"}


def module_file(name: str) -> Path | None:
    """pipeline.x.y -> its .py file (a package's __init__.py); None outside the project."""
    if name.split(".")[0] not in ("pipeline", "stages"):
        return None
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"


def imports(path: Path) -> set[Path]:
    """Project files `path` imports anywhere in it (functions included), but of cli.py only its
    module-level imports: each of its commands imports its own stage (and `cache` its own helpers)."""
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


def stages():
    for pipeline in PIPELINES:
        spec = yaml.safe_load((REPO / pipeline).read_text())
        for name, stage in spec["stages"].items():
            stage = stage.get("do", stage)
            command = re.search(r"pipeline ([a-z-]+)", stage["cmd"])[1]
            yield pytest.param(stage, COMMANDS[command], id=f"{pipeline}:{name}")


@pytest.mark.parametrize(("stage", "module"), list(stages()))
def test_stage_deps_cover_every_imported_source_file(stage, module):
    needed = closure({REPO / "pipeline/cli.py", REPO / "pipeline/__init__.py", REPO / f"stages/{module}.py"})
    deps = [REPO / d for d in stage["deps"] if not d.startswith("data_cache")]
    missing = sorted(str(p.relative_to(REPO)) for p in needed
                     if p.name != "__init__.py" or p.parent.name == "pipeline"
                     if not any(p == d or d in p.parents for d in deps))
    missing = [m for m in missing if m != "stages/__init__.py"]
    assert not missing, f"imported but not in deps: {', '.join(missing)}"
