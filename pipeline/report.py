"""The report: every student run aggregated into one table (and figures) the thesis is judged by.

Runs are named <variant>-s<seed>. Each run's test split is read once here; its validation
accuracy (what variants are chosen on) comes from its checkpoint. Differences to the
baseline are paired by seed, with a t-based 95 % interval. A teacher store of the test
split adds the teachers' confidence drops and a grid of teacher and student explanations.
"""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from pipeline.config import ReportConfig
from pipeline.data import SampleSet, get_test_split, normalize
from pipeline.errors import PipelineError
from pipeline.evaluation import top1
from pipeline.explain import CamLayer, explain, probe_input, upsample_minmax
from pipeline.models.checkpoint import load_checkpoint
from pipeline.scoring import best_explainer, confidence_drop
from pipeline.store.codec import dequantize_cam
from pipeline.store.layout import teacher_array, teacher_arrays
from pipeline.store.teacher_store import TeacherStore

RUN_NAME = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")


def run_table(cfg: ReportConfig, test: SampleSet) -> pd.DataFrame:
    """One row per run: variant, seed, validation and test top-1, and the number of test images (`test_n`), which
    sets how fine a difference the test top-1 can tell."""
    rows = []
    for (variant, seed), path in named_runs(Path(cfg.students_dir)).items():
        model, record = load_checkpoint(path)
        rows.append({"variant": variant, "seed": seed, "val_top1": record.get("val_top1"), "test_top1": top1(model, test),
                     "test_n": len(test)})
    return pd.DataFrame(rows)


def named_runs(students_dir: Path) -> dict[tuple[str, int], Path]:
    """(variant, seed) -> checkpoint of every run named <variant>-s<seed>; two runs that name the same pair
    (kd-s1 and kd-s01) would be paired with the other variants' runs at random, so they stop the report."""
    runs: dict[tuple[str, int], Path] = {}
    for path in sorted(students_dir.glob("*/checkpoint.pt")):
        match = RUN_NAME.match(path.parent.name)
        if not match:
            continue
        key = (match["variant"], int(match["seed"]))
        if key in runs:
            raise PipelineError(f"runs {runs[key].parent.name} and {path.parent.name} under {students_dir} are both "
                                f"variant {key[0]} seed {key[1]}; rename or remove one")
        runs[key] = path
    if not runs:
        raise PipelineError(f"no runs named <variant>-s<seed> under {students_dir}; "
                            "train students with --run-name <variant>-s<seed>")
    return runs


def summarise(runs: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per variant: seeds, mean/std of val and test top-1, paired test difference to `baseline` and its 95 % CI."""
    base = runs[runs.variant == baseline].set_index("seed")["test_top1"]
    table = []
    for variant, group in runs.groupby("variant", sort=False):
        row = {"variant": variant, "seeds": len(group),
               "val_mean": group.val_top1.mean(), "test_mean": group.test_top1.mean(), "test_std": group.test_top1.std()}
        paired = (group.set_index("seed")["test_top1"] - base).dropna()
        if variant != baseline and len(paired) >= 2:
            half = stats.t.ppf(0.975, len(paired) - 1) * paired.std() / np.sqrt(len(paired))
            row |= {"pairs": len(paired), "diff_vs_baseline": paired.mean(), "ci_low": paired.mean() - half,
                    "ci_high": paired.mean() + half}
        table.append(row)
    return pd.DataFrame(table).sort_values("test_mean", ascending=False)


def comparison_pairs(comparisons: list[str], variants: list[str], baseline: str) -> list[tuple[str, str]]:
    """`VARIANT:AGAINST` strings -> (variant, against) pairs; none given: every variant against `baseline`."""
    if not comparisons:
        return [(variant, baseline) for variant in variants if variant != baseline and baseline in variants]
    pairs = []
    for text in comparisons:
        variant, sep, against = text.rpartition(":")
        unknown = [name for name in (variant, against) if name not in variants]
        if not sep or unknown:
            raise PipelineError(f"--comparisons {text}: write VARIANT:AGAINST with variants that have runs; "
                                f"{'no runs of ' + ', '.join(unknown) + '; ' if sep else ''}the runs' variants: "
                                f"{', '.join(sorted(variants))}")
        pairs.append((variant, against))
    if len(set(pairs)) < len(pairs):
        raise PipelineError(f"--comparisons {','.join(comparisons)} names a comparison twice, which would count it "
                            "twice in Holm's correction; name each once")
    return pairs


def compare(runs: pd.DataFrame, pairs: list[tuple[str, str]], alpha: float = 0.05) -> pd.DataFrame:
    """The family of primary comparisons, each (variant, against): the paired (same seed) test top-1 difference,
    its t interval at 1 - alpha, the two-sided paired t test's p-value, and Holm's step-down over the family: the
    adjusted p-value, and the interval at the level Holm tests that comparison at (alpha / (m - i + 1) for the
    i-th smallest p-value, held from the first comparison it cannot reject on, so that an interval excludes 0 just
    where the adjusted p-value is below alpha). m counts every comparison, those with fewer than two pairs (no
    test: never rejected, last in Holm's order) too, so a missing seed never shrinks the correction."""
    test = runs.set_index(["variant", "seed"])["test_top1"]
    rows = []
    for variant, against in pairs:
        paired = (test[variant] - test[against]).dropna()
        n, mean, sd = len(paired), paired.mean(), paired.std()
        row = {"comparison": f"{variant} - {against}", "pairs": n, "diff": mean, "se": np.nan, "p": np.nan}
        if n >= 2:  # fewer pairs have no spread: no interval, no test
            se = sd / np.sqrt(n)
            p = 2 * stats.t.sf(abs(mean) / se, n - 1) if se > 0 else float(mean == 0)
            row |= {"se": se, "p": p, **interval(mean, se, n, alpha, "ci")}
        rows.append(row)
    table = pd.DataFrame(rows, columns=["comparison", "pairs", "diff", "se", "p", "ci_low", "ci_high"])
    order = table.p.dropna().sort_values(kind="stable").index
    m, running, stop, holm = len(table), 0.0, None, {}  # an untested comparison (one pair) still counts in m
    for rank, index in enumerate(order):
        row = table.loc[index]
        running = max(running, min(1.0, (m - rank) * row["p"]))
        if stop is None and running > alpha:
            stop = rank
        level = alpha / (m - (rank if stop is None else stop))
        holm[index] = {"p_holm": running, **interval(row["diff"], row["se"], int(row["pairs"]), level, "holm")}
    return table.join(pd.DataFrame.from_dict(holm, orient="index")).drop(columns=["se"], errors="ignore")


def interval(mean: float, se: float, n: int, alpha: float, name: str) -> dict:
    half = stats.t.ppf(1 - alpha / 2, n - 1) * se
    return {f"{name}_low": mean - half, f"{name}_high": mean + half}


def write_metrics(summary: pd.DataFrame, comparisons: pd.DataFrame, path: Path) -> None:
    """The summary as DVC reads metrics: {variant: {field: number}}; the baseline has no difference to itself,
    and `pairs` is the number of seeds both ran (the paired difference's sample). The primary comparisons go
    under "comparisons": {"A - B": {field: number}}."""
    fields = ("seeds", "test_mean", "test_std", "pairs", "diff_vs_baseline", "ci_low", "ci_high")
    metrics = {row["variant"]: numbers(row, fields) for row in summary.to_dict("records")}
    metrics["comparisons"] = {row["comparison"]: numbers(row, [c for c in comparisons.columns if c != "comparison"])
                              for row in comparisons.to_dict("records")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=1, allow_nan=False) + "\n")  # a non-finite value stops here


def numbers(row: dict, fields) -> dict:
    """The row's finite `fields`, counts as int, the others rounded to 6 digits."""
    return {f: (int(row[f]) if f in ("seeds", "pairs") else round(float(row[f]), 6))
            for f in fields if f in row and pd.notna(row[f])}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(summary: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(summary) + 1.2))
    ax.barh(summary.variant, 100 * summary.test_mean, xerr=100 * summary.test_std.fillna(0), color="tab:blue")
    ax.set_xlabel("test top-1 (%), mean and std over seeds")
    ax.set_xlim(100 * (summary.test_mean.min() - 3 * summary.test_std.fillna(0).max() - 0.02), 100)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def teacher_drops(store: TeacherStore) -> dict[str, np.ndarray]:
    """Confidence drop of every readable cached sample, per teacher (finished blocks only)."""
    drops = {}
    for name in store.teachers:
        parts = []
        for block in store.finished_blocks([name]):
            rows = store.read_rows(*store.block_rows(block), ["valid", teacher_array(name, "y_prob"),
                                                                 teacher_array(name, "o_prob")])
            y, o = (torch.from_numpy(rows[teacher_array(name, k)][rows["valid"]]) for k in ("y_prob", "o_prob"))
            parts.append(confidence_drop(y, o).numpy())
        drops[name] = np.concatenate(parts) if parts else np.zeros(0)
    return drops


def plot_drops(drops: dict[str, np.ndarray], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, values in drops.items():
        ax.hist(values, bins=np.linspace(0, 1, 41), histtype="step", linewidth=1.5,
                label=f"{name} (mean {values.mean():.3f})")
    ax.set_xlabel("Grad-CAM++ confidence drop max(0, Y - O) / Y on the store's split (lower is better)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def explanation_rows(store: TeacherStore, test: SampleSet, runs: dict[str, Path], count: int) -> list[dict]:
    """For `count` test images spread over the store's finished, readable rows: the image, each
    teacher's cached map and confidence drop, the teacher the per-sample policy picks, and each
    student run's own Grad-CAM and drop."""
    finished = store.finished_blocks(store.teachers)
    rows_done = np.concatenate([np.arange(*store.block_rows(b)) for b in finished]) if finished else np.zeros(0, int)
    readable = rows_done[store.read_rows(0, store.num_samples, ["valid"])["valid"][rows_done]]
    if not len(readable):
        raise PipelineError(f"store {store.location} has no finished, readable rows to draw; finish its extraction")
    indices = readable[np.linspace(0, len(readable) - 1, min(count, len(readable))).round().astype(int)]
    images = torch.from_numpy(np.stack([test.image(int(i)) for i in indices]))
    labels = torch.as_tensor(test.labels[indices])
    size = tuple(test.info.image_shape[:2])
    rows = [{"image": image.numpy(), "label": int(label), "maps": {}, "drops": {}} for image, label in zip(images, labels)]
    fields = teacher_arrays(store.teachers, ("cam", "cam_max", "y_prob", "o_prob"))
    cached = [store.read_rows(int(i), int(i) + 1, fields) for i in indices]
    column = lambda name, key: np.concatenate([c[teacher_array(name, key)] for c in cached])  # noqa: E731
    y, o = [], []
    for name in store.teachers:
        cams = dequantize_cam(column(name, "cam"), column(name, "cam_max"))
        y.append(torch.from_numpy(column(name, "y_prob")))
        o.append(torch.from_numpy(column(name, "o_prob")))
        for row, cam, drop in zip(rows, upsample_minmax(cams, size), confidence_drop(y[-1], o[-1])):
            row["maps"][name], row["drops"][name] = cam.numpy(), float(drop)
    chosen = best_explainer(torch.stack(y, 1), torch.stack(o, 1)).tolist() if y else [None] * len(rows)
    for row, m in zip(rows, chosen):
        row["chosen"] = None if m is None else store.teachers[m]
    for run, path in runs.items():
        model, record = load_checkpoint(path)
        mean, std = record["transform"]["mean"], record["transform"]["std"]
        layer = CamLayer.of(model.eval(), probe_input(test.info.image_shape))
        result = explain(model, layer, normalize(images, mean, std), labels, "label", mean, std)
        for row, cam, drop in zip(rows, upsample_minmax(result.cam, size), confidence_drop(result.y_prob, result.o_prob)):
            row["maps"][run], row["drops"][run] = cam.numpy(), float(drop)
    return rows


def plot_explanations(rows: list[dict], path: Path) -> None:
    """One row per image: the image, then every teacher's and student's Grad-CAM over it, titled
    with its confidence drop; the chosen teacher's title is marked."""
    plt = pyplot()
    columns = list(rows[0]["maps"])
    fig, axes = plt.subplots(len(rows), len(columns) + 1, figsize=(1.9 * (len(columns) + 1), 2.0 * len(rows)),
                             squeeze=False)
    for ax_row, row in zip(axes, rows):
        image = row["image"][..., 0] if row["image"].shape[-1] == 1 else row["image"]
        ax_row[0].imshow(image, cmap="gray")
        ax_row[0].set_title(f"label {row['label']}", fontsize=8)
        for ax, name in zip(ax_row[1:], columns):
            ax.imshow(image, cmap="gray")
            ax.imshow(row["maps"][name], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            mark = " (chosen)" if name == row["chosen"] else ""
            ax.set_title(f"{name}{mark}\ndrop {row['drops'][name]:.2f}", fontsize=7,
                         fontweight="bold" if mark else "normal")
        for ax in ax_row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_report(cfg: ReportConfig) -> pd.DataFrame:
    """The whole report of `cfg`: runs.csv, results.csv and .md, accuracy.png (with --store also drops.png and
    explanations.png) and the metrics file; returns the summary."""
    shown = {run: Path(cfg.students_dir) / run / "checkpoint.pt" for run in cfg.explain_runs}
    missing = [run for run, path in shown.items() if not path.is_file()]
    test = get_test_split(cfg.dataset, cfg.data_root, cfg.split_seed, cfg.download)
    if cfg.store:  # fail on a wrong store or run name before every run's test split is read
        if missing:
            raise PipelineError(f"--explain-runs {', '.join(missing)}: no such run under {cfg.students_dir}; "
                                "name runs that exist (<variant>-s<seed>)")
        if cfg.explain_images < 1:
            raise PipelineError(f"--explain-images must be at least 1; got {cfg.explain_images}")
        store = TeacherStore.open(cfg.store)
        store.check_holds(test.identity())
    runs = run_table(cfg, test)
    summary = summarise(runs, cfg.baseline)
    comparisons = compare(runs, comparison_pairs(cfg.comparisons, sorted(runs.variant.unique()), cfg.baseline))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "results.csv", index=False)
    comparisons.to_csv(out / "comparisons.csv", index=False)
    text = summary.to_markdown(index=False, floatfmt=".4f")
    if len(comparisons):
        text += ("\n\nPrimary comparisons (paired by seed): the difference, its 95 % t interval (ci) and p-value, "
                 f"and Holm's correction over the {len(comparisons)}: adjusted p-value and interval (holm)\n\n"
                 + comparisons.to_markdown(index=False, floatfmt=".4f"))
    (out / "results.md").write_text(f"{cfg.dataset}: test top-1 over seeds; paired differences to "
                                    f"`{cfg.baseline}` with 95 % t intervals\n\n{text}\n")
    plot(summary, out / "accuracy.png")
    if cfg.metrics:
        write_metrics(summary, comparisons, Path(cfg.metrics))
    if cfg.store:
        plot_drops(teacher_drops(store), out / "drops.png")
        plot_explanations(explanation_rows(store, test, shown, cfg.explain_images), out / "explanations.png")
    print(text)
    return summary
