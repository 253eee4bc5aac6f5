"""Training teachers with cross-entropy (for the embedded and CIFAR-style data sets): checkpoints and their
test metrics."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.augment import Augmentation, check_flip, model_input
from pipeline.config import TrainTeachersConfig
from pipeline.data import ArrayDataset, SampleSet, get_dataset, get_test_split, get_val_split
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


def specialty(data: SampleSet, domain: str, classes: list[int]) -> np.ndarray:
    """The rows of `data` a specialist learns: those of group `domain` ("" for all) and of `classes` ([] for all)."""
    if not isinstance(data, ArrayDataset):
        raise PipelineError(f"--domain and --classes train specialists on in-memory data sets (embedded, CIFAR); "
                            f"{data.info.name} is read from image files")
    keep = np.ones(len(data), bool)
    if domain:
        groups = data.groups
        if groups is None:
            raise PipelineError(f"--domain {domain}: data set {data.info.name!r} has no domains; shape-domains has")
        if domain not in set(groups):
            raise PipelineError(f"--domain {domain}: not a domain of {data.info.name}; choose one of: "
                                f"{', '.join(sorted(set(groups)))}")
        keep &= groups == domain
    if classes:
        wrong = [c for c in classes if not 0 <= c < data.info.num_classes]
        if wrong:
            raise PipelineError(f"--classes: {wrong[0]} is not a class of {data.info.name} (0 to "
                                f"{data.info.num_classes - 1})")
        keep &= np.isin(data.labels, classes)
    return np.flatnonzero(keep)


def specialist_suffix(domain: str, classes: list[int]) -> str:
    """What a specialist's name adds to its architecture's: -<domain>, -c<class>_<class>..."""
    return (f"-{domain}" if domain else "") + ("-c" + "_".join(map(str, classes)) if classes else "")


def group_top1(model, test: SampleSet) -> dict[str, float]:
    """Test top-1 on each group of a data set with groups (a specialist's own domain and the others)."""
    groups = test.groups
    if groups is None:
        return {}
    return {f"top1_{group}": top1(model, test.subset(np.flatnonzero(groups == group))) for group in sorted(set(groups))}


def train_teachers(cfg: TrainTeachersConfig) -> dict[str, dict]:
    """Train every teacher of `cfg`, write <out-dir>/<name>.pt and metrics.json; returns the metrics."""
    suffix = specialist_suffix(cfg.domain, cfg.classes)
    teachers = [(name + suffix, arch, seed) for name, arch, seed in named_seeds(cfg.teachers, cfg.seed)]
    train = get_dataset(cfg.dataset, "train", cfg.data_root, cfg.split_seed, cfg.download)
    if suffix:
        train = train.subset(specialty(train, cfg.domain, cfg.classes))
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
            x, labels = model_input(batch, augmentation.draw(len(batch["labels"])), info.mean, info.std)
            return {"ce": Term.over(F.cross_entropy(teacher(x), labels, reduction="none"))}

        steps = -(-len(train) // cfg.batch_size)
        history = fit(model, batches, loss_fn, epochs=cfg.epochs, steps_per_epoch=lambda epoch: steps,
                      lr=cfg.lr, weight_decay=cfg.weight_decay, schedule=cfg.lr_schedule_of(), desc=f"teacher {name}")
        metrics = {**evaluate_model(model, test, cfg.target, batch_size=256, desc=name), **group_top1(model, test),
                   **({"val_top1": top1(model, val)} if val else {}), "params": count_parameters(model)}
        print(f"teacher {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        save_checkpoint(out_dir / f"{name}.pt", model, {
            "name": name, "arch": arch, "seed": seed, "in_channels": info.image_shape[2], "num_classes": info.num_classes,
            "dataset": train.identity(), "val_dataset": val.identity() if val else None,  # where val_top1 is from
            "transform": {"mean": list(info.mean), "std": list(info.std)},
            "config": dataclasses.asdict(cfg), "metrics": metrics, "history": history,
        })
        all_metrics[name] = metrics
    metrics_file = out_dir / "metrics.json"  # the teachers trained into this folder before, still there, keep theirs
    earlier = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    kept = {name: figures for name, figures in earlier.items() if (out_dir / f"{name}.pt").is_file()}
    metrics_file.write_text(json.dumps({**kept, **all_metrics}, indent=2) + "\n")
    return all_metrics
