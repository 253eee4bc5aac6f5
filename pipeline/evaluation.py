"""Test metrics of a model (top-1/top-5 accuracy and the quality of its own Grad-CAM), and of every student
run beside its teachers."""

import json
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import EvaluateConfig
from pipeline.data import SampleSet, get_test_split, normalize
from pipeline.errors import PipelineError
from pipeline.explain import CamLayer, explain, probe_input
from pipeline.models import count_parameters
from pipeline.models.checkpoint import load_checkpoint
from pipeline.scoring import confidence_drop


@torch.inference_mode()
def top1(model: nn.Module, dataset: SampleSet, batch_size: int = 256) -> float:
    """Plain top-1 accuracy (no explanations): what hyperparameters are chosen on."""
    model.eval()
    correct = 0
    for images, labels in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        correct += int((model(normalize(images, dataset.info.mean, dataset.info.std)).argmax(1) == labels).sum())
    return correct / len(dataset)


def evaluate_model(model: nn.Module, dataset: SampleSet, target: str, batch_size: int, desc: str) -> dict:
    """Accuracy, mean Grad-CAM++ confidence drop and increase-in-confidence rate on `dataset`."""
    model.eval()
    layer = CamLayer.of(model, probe_input(dataset.info.image_shape))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    top1 = top5 = drop = increase = 0.0
    k = min(5, dataset.info.num_classes)
    for images, labels in tqdm(loader, desc=f"evaluate {desc}", leave=False, disable=None):
        mean, std = dataset.info.mean, dataset.info.std
        result = explain(model, layer, normalize(images, mean, std), labels, target, mean, std)
        ranked = result.logits.topk(k, dim=1).indices
        top1 += (ranked[:, 0] == labels).sum().item()
        top5 += (ranked == labels[:, None]).any(1).sum().item()
        drop += confidence_drop(result.y_prob, result.o_prob).sum().item()
        increase += (result.o_prob > result.y_prob).sum().item()
    n = len(dataset)
    metrics = {"top1": top1 / n, "mean_confidence_drop": drop / n, "increase_in_confidence": increase / n}
    if dataset.info.num_classes > 5:
        metrics["top5"] = top5 / n
    return metrics


def evaluate_runs(cfg: EvaluateConfig) -> dict:
    """Test metrics of every student under `cfg.students_dir` beside the teachers', written to `cfg.out` as JSON
    and printed as a table."""
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

