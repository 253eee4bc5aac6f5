"""Training teachers with cross-entropy (for the embedded and CIFAR-style data sets): checkpoints and their
test metrics."""

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.augment import Augmentation, check_flip, model_input
from pipeline.config import TrainTeachersConfig
from pipeline.data import get_dataset, get_test_split, get_val_split
from pipeline.errors import PipelineError
from pipeline.evaluation import evaluate_model, top1
from pipeline.models import MODELS, count_parameters, create_model
from pipeline.models.checkpoint import save_checkpoint
from pipeline.objective import Term
from pipeline.train import fit, seeded_generator


def named_seeds(teachers: list[str], seed: int) -> list[tuple[str, str, int]]:
    """`teachers` entries -> (name, arch, seed): `arch` trains with `seed` under its own name, `arch@N` with seed N
    under the name arch-sN (several teachers of one architecture, as CA-MKD's three resnet32x4)."""
    named = []
    for entry in teachers:
        arch, at, own = entry.partition("@")
        MODELS.get(arch)  # fail on a bad name before hours of training
        if at and not own.isdigit():
            raise PipelineError(f"teacher {entry!r}: write <arch>@<seed> with a whole-number seed, e.g. {arch}@1")
        named.append((f"{arch}-s{own}", arch, int(own)) if at else (arch, arch, seed))
    names = [name for name, _, _ in named]
    if len(set(names)) < len(names):
        raise PipelineError(f"teachers {', '.join(teachers)} name one checkpoint twice; give each its own seed: <arch>@<seed>")
    return named


def train_teachers(cfg: TrainTeachersConfig) -> dict[str, dict]:
    """Train every teacher of `cfg`, write <out-dir>/<name>.pt and metrics.json; returns the metrics."""
    teachers = named_seeds(cfg.teachers, cfg.seed)
    train = get_dataset(cfg.dataset, "train", cfg.data_root, cfg.split_seed, cfg.download)
    test = get_test_split(cfg.dataset, cfg.data_root, cfg.split_seed, cfg.download)
    val = get_val_split(cfg.dataset, cfg.data_root, cfg.split_seed, cfg.download)
    info, out_dir = train.info, Path(cfg.out_dir)
    check_flip(cfg.flip, info)
    all_metrics = {}
    for name, arch, seed in teachers:
        torch.manual_seed(seed)
        model = create_model(arch, info.image_shape[2], info.num_classes)

        def batches(epoch: int):
            loader = torch.utils.data.DataLoader(
                train, batch_size=cfg.batch_size, shuffle=True, generator=seeded_generator(seed, epoch)
            )
            return ({"images": images, "labels": labels} for images, labels in loader)

        augmentation = Augmentation(cfg.shift, cfg.flip, seed)

        def loss_fn(teacher, batch: dict) -> dict[str, Term]:
            x, labels, _ = model_input(batch, augmentation, info.mean, info.std)
            return {"ce": Term.over(F.cross_entropy(teacher(x), labels, reduction="none"))}

        steps = -(-len(train) // cfg.batch_size)
        history = fit(model, batches, loss_fn, epochs=cfg.epochs, steps_per_epoch=lambda epoch: steps,
                      lr=cfg.lr, weight_decay=cfg.weight_decay, schedule=cfg.lr_schedule_of(), desc=f"teacher {name}")
        metrics = {**evaluate_model(model, test, cfg.target, batch_size=256, desc=name),
                   **({"val_top1": top1(model, val)} if val else {}), "params": count_parameters(model)}
        print(f"teacher {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        save_checkpoint(out_dir / f"{name}.pt", model, {
            "name": name, "arch": arch, "seed": seed, "in_channels": info.image_shape[2], "num_classes": info.num_classes,
            "dataset": train.identity(), "val_dataset": val.identity() if val else None,  # where val_top1 is from
            "transform": {"mean": list(info.mean), "std": list(info.std)},
            "config": dataclasses.asdict(cfg), "metrics": metrics, "history": history,
        })
        all_metrics[name] = metrics
    (out_dir / "metrics.json").write_text(json.dumps(all_metrics, indent=2) + "\n")
    return all_metrics
