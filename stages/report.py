"""Stage: aggregate every student run into one table (and a figure) the thesis is judged by.

Runs are named <variant>-s<seed>. Each run's test split is read once here; its validation
accuracy (what variants are chosen on) comes from its checkpoint. Differences to the
baseline are paired by seed, with a t-based 95 % interval.
"""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from pipeline.cache import TeacherStore
from pipeline.config import ReportConfig
from pipeline.data import get_test_split
from pipeline.errors import PipelineError
from pipeline.evaluation import top1
from pipeline.explain import confidence_drop
from pipeline.models.checkpoint import load_checkpoint

RUN_NAME = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")


def run_table(cfg: ReportConfig) -> pd.DataFrame:
    """One row per run: variant, seed, validation and test top-1."""
    test = get_test_split(cfg.dataset, cfg.data_root, cfg.split_seed, cfg.download)
    rows = []
    for path in sorted(Path(cfg.students_dir).glob("*/checkpoint.pt")):
        match = RUN_NAME.match(path.parent.name)
        if not match:
            continue
        model, record = load_checkpoint(path)
        rows.append({"variant": match["variant"], "seed": int(match["seed"]), "val_top1": record.get("val_top1"),
                     "test_top1": top1(model, test)})
    if not rows:
        raise PipelineError(f"no runs named <variant>-s<seed> under {cfg.students_dir}; "
                            "train students with --run-name <variant>-s<seed>")
    return pd.DataFrame(rows)


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
            row |= {"diff_vs_baseline": paired.mean(), "ci_low": paired.mean() - half, "ci_high": paired.mean() + half}
        table.append(row)
    return pd.DataFrame(table).sort_values("test_mean", ascending=False)


def plot(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            rows = store.read_rows(*store.block_rows(block), ["valid", f"teachers/{name}/y_prob",
                                                                 f"teachers/{name}/o_prob"])
            y, o = (torch.from_numpy(rows[f"teachers/{name}/{k}"][rows["valid"]]) for k in ("y_prob", "o_prob"))
            parts.append(confidence_drop(y, o).numpy())
        drops[name] = np.concatenate(parts) if parts else np.zeros(0)
    return drops


def plot_drops(drops: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, values in drops.items():
        ax.hist(values, bins=np.linspace(0, 1, 41), histtype="step", linewidth=1.5,
                label=f"{name} (mean {values.mean():.3f})")
    ax.set_xlabel("Grad-CAM++ confidence drop max(0, Y - O) / Y on the cached split (lower is better)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: ReportConfig) -> pd.DataFrame:
    runs = run_table(cfg)
    summary = summarise(runs, cfg.baseline)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "results.csv", index=False)
    text = summary.to_markdown(index=False, floatfmt=".4f")
    (out / "results.md").write_text(f"{cfg.dataset}: test top-1 over seeds; paired differences to "
                                    f"`{cfg.baseline}` with 95 % t intervals\n\n{text}\n")
    plot(summary, out / "accuracy.png")
    if cfg.store:
        plot_drops(teacher_drops(TeacherStore.open(cfg.store)), out / "drops.png")
    print(text)
    return summary
