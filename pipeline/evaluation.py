"""Test metrics of one model: top-1/top-5 accuracy and the quality of its own Grad-CAM."""

import torch
from torch import nn
from tqdm import tqdm

from pipeline.data import SampleSet, normalize
from pipeline.explain import CamLayer, explain, probe_input
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
