"""mkdocs hooks: the pages of the docs site that are made from what the repository holds, at build time.

- One page per study in reports/: `studies/<study>.md` is the study's hand-written page (what it asks, its
  config, the command, the discussion); the line `<!-- generated: study -->` in it (or its end, without one)
  becomes the study's reports/<study>/results.md, links to its results.csv and runs.csv, its figures and what
  `pipeline store selection` wrote for it (reports/selection/<study>-<split>.txt). A
  study of reports/ without a hand-written page gets a page of its own. The figures and CSV files are copied
  into the site beside the page, so every link resolves under `mkdocs build --strict`.
- `<!-- generated: bench reports/bench.json -->`: the table that `pipeline bench --json PATH` wrote.
- `<!-- generated: bucket reports/bucket-reads.json -->`: the figures of `python benchmarks/bucket_reads.py`.
- `<!-- generated: default-run -->`: the default pipeline's metrics (data_cache/metrics.json) as a table.
- `<!-- generated: readme Quick start -->`: the body of that section of README.md, so the commands live once.
- `changelog.md`: CHANGELOG.md.

Nothing here imports the project, so the site builds from a checkout with mkdocs alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, InclusionLevel
from mkdocs.structure.nav import Section

MARKER = re.compile(r"^<!-- generated: (?P<kind>[\w-]+)(?: (?P<arg>.*?))? -->[ \t]*$", re.MULTILINE)
FIGURES = {  # what `pipeline report` draws, in the order a page shows them
    "accuracy": "Test top-1 of every run, per variant",
    "drops": "Each teacher's confidence drops on the test split",
    "explanations": "Test images with each teacher's Grad-CAM and confidence drop (the lowest drop, "
                    "`--policy per-sample`'s choice, in bold) and the Grad-CAM of the student runs named by `--explain-runs`",
}
COPIED = (".png", ".csv")  # what a study page links to; results.md is put into the page itself
NEW_STUDIES: list[str] = []  # pages made for studies that have no hand-written page (on_nav lists them)


def repo_root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def study_parts(folder: Path) -> list[Path]:
    """The folders of one study's report: the study's own, or one per comparison (as the views study's)."""
    if (folder / "results.md").is_file():
        return [folder]
    return sorted(part for part in folder.iterdir() if part.is_dir() and (part / "results.md").is_file())


def studies(root: Path) -> dict[str, list[Path]]:
    reports = root / "reports"
    found = {}
    for folder in sorted(reports.iterdir()) if reports.is_dir() else []:
        parts = study_parts(folder) if folder.is_dir() else []
        if parts:
            found[folder.name] = parts
    return found


def on_files(files, config):
    root = repo_root(config)
    NEW_STUDIES.clear()
    for name, parts in studies(root).items():
        for part in parts:
            for path in sorted(part.iterdir()):
                if path.suffix in COPIED:
                    uri = f"studies/{path.relative_to(root / 'reports').as_posix()}"
                    files.append(File.generated(config, uri, abs_src_path=str(path)))
        page = f"studies/{name}.md"
        if files.get_file_from_path(page) is None:
            NEW_STUDIES.append(page)
            files.append(File.generated(config, page, inclusion=InclusionLevel.NOT_IN_NAV, content=(
                f"# {name}\n\nThis study's report, as `pipeline report` wrote it under `reports/{name}/`. Rerun it "
                f"with `dvc repro studies/{name}/dvc.yaml`; its settings are in `studies/{name}/params.yaml`.\n\n"
                "<!-- generated: study -->\n")))
    changelog = root / "CHANGELOG.md"
    if changelog.is_file():
        files.append(File.generated(config, "changelog.md", abs_src_path=str(changelog)))
    return files


def on_nav(nav, config, files):
    """A study page made here goes beside the hand-written ones (after them, in the section of studies/index.md)."""
    def sections(items):
        for item in items:
            if isinstance(item, Section):
                yield item
                yield from sections(item.children)

    home = next((s for s in sections(nav.items) if any(getattr(getattr(c, "file", None), "src_uri", None)
                                                        == "studies/index.md" for c in s.children)), None)
    for uri in NEW_STUDIES:
        page = files.get_file_from_path(uri).page
        page.parent = home
        (home.children if home else nav.items).append(page)
        nav.pages.append(page)
    NEW_STUDIES.clear()
    return nav


def study_markdown(root: Path, name: str) -> str:
    parts = studies(root).get(name)
    if not parts:
        raise PluginError(f"reports/{name}/ holds no results.md")
    out = []
    for part in parts:
        rel = part.relative_to(root / "reports").as_posix()  # "digits", "cluttered-digits-views/vs-kd-shift4"
        link = rel.split("/", 1)[1] if "/" in rel else ""
        link = f"{name}/{link}/" if link else f"{name}/"
        if part != root / "reports" / name:
            out.append(f"### {part.name}\n")
        caption, _, table = (part / "results.md").read_text().strip().partition("\n")
        out.append(f"{caption.strip()} (`reports/{rel}/results.md`):\n\n{table.strip()}\n")
        csvs = [p.name for p in sorted(part.glob("*.csv"))]
        if csvs:
            out.append("Files: " + ", ".join(f"[{c}]({link}{c})" for c in csvs) + ".\n")
        pngs = sorted(part.glob("*.png"), key=lambda p: (list(FIGURES).index(p.stem) if p.stem in FIGURES
                                                         else len(FIGURES), p.stem))
        for png in pngs:
            out.append(f"![{png.stem}]({link}{png.name})\n\n*{png.name}: {FIGURES.get(png.stem, png.stem)}.*\n")
    for split in ("train", "val", "test"):
        selection = root / "reports" / "selection" / f"{name}-{split}.txt"
        if selection.is_file():
            out.append(f"What each policy chooses on the {split} store (`reports/selection/{selection.name}`, "
                       f"`pipeline store selection`):\n\n```text\n{selection.read_text().strip()}\n```\n")
    metrics = root / "reports" / "metrics"
    names = sorted(p.name for p in metrics.glob(f"{name}*.json")
                   if p.stem == name or p.stem.startswith(f"{name}-") and p.stem[len(name) + 1:] in
                   {part.name for part in parts})
    if names:
        out.append("DVC metrics: " + ", ".join(f"`reports/metrics/{n}`" for n in names) + ".\n")
    return "\n".join(out)


def bench_cell(value) -> str:
    """A value as `pipeline bench` prints it: ratios to 3 significant digits, rates as whole numbers."""
    if isinstance(value, float):
        return f"{value:,.3g}" if value < 100 else f"{value:,.0f}"
    return str(value)


def bench_markdown(root: Path, arg: str) -> str:
    path = root / arg
    if not path.is_file():
        raise PluginError(f"{arg} does not exist")
    run = json.loads(path.read_text())
    rows = ["| figure | value | peer | goal | met |", "|---|---|---|---|---|"]
    for f in run["figures"]:
        met = {True: "yes", False: "**no**", None: "-"}[f["met"]]
        rows.append(f"| {f['figure']} | {bench_cell(f['value'])} | {f['peer']} | {f['goal']} | {met} |")
    quick = " (`--quick`)" if run.get("quick") else ""
    return f"Machine{quick}: {run['machine']} (`{arg}`).\n\n" + "\n".join(rows) + "\n"


def bucket_markdown(root: Path, arg: str) -> str:
    """The figures `python benchmarks/bucket_reads.py --json PATH` wrote: counts, moto's times, what a bucket feeds."""
    path = root / arg
    if not path.is_file():
        raise PluginError(f"{arg} does not exist")
    figures = json.loads(path.read_text())
    feeds = figures.pop("a bucket feeds (samples/s per reading process)")
    rows = ["| figure | value |", "|:--|--:|"] + [f"| {name} | {bench_cell(value)} |" for name, value in figures.items()]
    rows += ["", "| a bucket of | feeds samples/s per reading process |", "|:--|--:|"]
    rows += [f"| {kind} | {rate:,.0f} |" for kind, rate in feeds.items()]
    return f"From `{arg}`:\n\n" + "\n".join(rows) + "\n"


def default_run_markdown(root: Path) -> str:
    path = root / "data_cache" / "metrics.json"
    metrics = json.loads(path.read_text())
    rows = ["| role | model | top1 | drop | increase | top5 | params |", "|:--|:--|--:|--:|--:|--:|--:|"]
    for role, group in (("teacher", "teachers"), ("student", "students")):
        for model, m in metrics.get(group, {}).items():
            rows.append(f"| {role} | {model} | {m['top1']:.4f} | {m['mean_confidence_drop']:.4f} | "
                        f"{m['increase_in_confidence']:.4f} | {m['top5']:.4f} | {m['params']} |")
    return "\n".join(rows) + "\n"


def readme_section(root: Path, title: str) -> str:
    text = (root / "README.md").read_text()
    found = re.search(rf"^## {re.escape(title)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    if not found:
        raise PluginError(f"README.md has no section '## {title}'")
    return found.group(1).strip() + "\n"


def on_page_markdown(markdown, page, config, files):
    root = repo_root(config)
    uri = page.file.src_uri
    study = uri[len("studies/"):-len(".md")] if uri.startswith("studies/") and uri.endswith(".md") else None
    if study in studies(root) and not any(m["kind"] == "study" for m in MARKER.finditer(markdown)):
        markdown = markdown.rstrip() + "\n\n## Results\n\n<!-- generated: study -->\n"

    def expand(match: re.Match) -> str:
        kind, arg = match["kind"], (match["arg"] or "").strip()
        if kind == "study":
            return study_markdown(root, arg or study or "")
        if kind == "bench":
            return bench_markdown(root, arg)
        if kind == "bucket":
            return bucket_markdown(root, arg)
        if kind == "default-run":
            return default_run_markdown(root)
        if kind == "readme":
            return readme_section(root, arg)
        raise PluginError(f"{uri}: unknown generated block {kind!r}")

    return MARKER.sub(expand, markdown)
