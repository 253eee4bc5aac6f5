"""Stage: test metrics of every student next to the teachers', as JSON and a printed table."""

import json
from pathlib import Path

import pandas as pd

from pipeline.config import EvaluateConfig
from pipeline.data import get_test_split
from pipeline.errors import PipelineError
from pipeline.evaluation import evaluate_model
from pipeline.models import count_parameters
from pipeline.models.checkpoint import load_checkpoint


def run(cfg: EvaluateConfig) -> dict:
    test = get_test_split(cfg.dataset, cfg.data_root, cfg.split_seed, cfg.download)
    teacher_file = Path(cfg.teacher_metrics)
    if not teacher_file.is_file():
        raise PipelineError(f"teacher metrics {teacher_file} do not exist; run `pipeline train-teachers` first")
    checkpoints = sorted(Path(cfg.students_dir).glob("*/checkpoint.pt"))
    if not checkpoints:
        raise PipelineError(f"no student checkpoints under {cfg.students_dir}; run `pipeline train-student` first")
    metrics = {"teachers": json.loads(teacher_file.read_text()), "students": {}}
    for path in checkpoints:
        model, record = load_checkpoint(path)
        if record["dataset"]["name"] != cfg.dataset:
            raise PipelineError(f"student {path} was trained on {record['dataset']['name']!r}, not {cfg.dataset!r}")
        metrics["students"][record["name"]] = {
            **evaluate_model(model, test, cfg.target, cfg.batch_size, desc=record["name"]),
            "params": count_parameters(model),
        }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    print(metrics_table(metrics).to_markdown(index=False, floatfmt=".4f"))
    return metrics


def metrics_table(metrics: dict) -> pd.DataFrame:
    """One row per model: role, name, then every metric."""
    rows = [{"role": role[:-1], "model": name, **values}
            for role in ("teachers", "students") for name, values in metrics[role].items()]
    return pd.DataFrame(rows).rename(columns={"mean_confidence_drop": "drop", "increase_in_confidence": "increase"})

