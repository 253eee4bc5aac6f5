"""Stage one: run every teacher once over a split and cache its artefacts in a Zarr store.

The work is done block by block (one block = one shard). For each block the images are
loaded once and every teacher that has not finished that block runs on them; a block
is marked finished per teacher only after its arrays are written.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.cache import TeacherStore, quantize_cam
from pipeline.config import ExtractConfig
from pipeline.data import get_dataset, normalize
from pipeline.errors import PipelineError
from pipeline.explain import CamLayer, captured, explain
from pipeline.models.checkpoint import load_checkpoint, weights_sha256


@dataclass
class Teacher:
    name: str
    model: nn.Module
    layer: CamLayer
    identity: dict  # what the store records about where this teacher came from
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_teacher(spec: str) -> Teacher:
    """A teacher from `checkpoint:<path>` or a bare checkpoint path."""
    path = Path(spec.removeprefix("checkpoint:"))
    model, record = load_checkpoint(path)
    layer = CamLayer.of(model)
    transform = record["transform"]
    identity = {
        "arch": record["arch"], "source": f"checkpoint:{path}", "weights_sha256": weights_sha256(model),
        "target_layer": layer.target_layer, "cam_path": layer.path, "transform": transform,
        "heldout_top1": record.get("metrics", {}).get("top1"),
    }
    return Teacher(record["name"], model, layer, identity, tuple(transform["mean"]), tuple(transform["std"]))


def map_shape(teacher: Teacher, image_shape: tuple[int, int, int]) -> tuple[int, int]:
    """The Grad-CAM resolution of `teacher` at this data set's image size (one probe pass)."""
    probe = torch.zeros(1, image_shape[2], image_shape[0], image_shape[1])
    with torch.no_grad(), captured(teacher.model, teacher.layer.target_layer) as box:
        teacher.model(probe)
    return tuple(box["activation"].shape[-2:])


def run(cfg: ExtractConfig) -> TeacherStore:
    dataset = get_dataset(cfg.dataset, cfg.split, cfg.data_root, cfg.split_seed)
    teachers = [load_teacher(spec) for spec in cfg.teachers]
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise PipelineError(f"teacher names must be unique, got {', '.join(names)}")
    with TeacherStore.locked(cfg.store):  # parallel extractors of one store create it once
        store = TeacherStore.create(
            cfg.store, dataset.identity(), dataset.labels, dataset.images, target=cfg.target,
            block_size=cfg.block_size,
        )
        for t in teachers:
            store.add_teacher(t.name, t.identity, dataset.info.num_classes, map_shape(t, dataset.info.image_shape))
    part, parts = cfg.block_part()
    pending = {t.name: {b for b in store.pending_blocks(t.name) if b % parts == part} for t in teachers}
    blocks = sorted(set().union(*pending.values()))
    print(f"store {store.path}: {len(blocks)} of {store.num_blocks} blocks to extract"
          + (f" (part {cfg.blocks})" if cfg.blocks else ""))
    for block in tqdm(blocks, desc=f"extract {cfg.split} ({len(teachers)} teachers)", unit="block"):
        start, stop = store.block_rows(block)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, range(start, stop)), batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
        )
        batches = list(loader)
        for t in teachers:
            if block in pending[t.name]:
                store.write_block(t.name, block, explain_block(t, batches, cfg.target))
    return store


def explain_block(teacher: Teacher, batches: list, target: str) -> dict[str, np.ndarray]:
    parts = []
    for images, labels in batches:
        x = normalize(images, teacher.mean, teacher.std)
        result = explain(teacher.model, teacher.layer, x, labels, target, teacher.mean, teacher.std)
        cam_u8, cam_max = quantize_cam(result.cam)
        parts.append({
            "logits": result.logits.half().numpy(), "cam": cam_u8, "cam_max": cam_max,
            "y_prob": result.y_prob.numpy(), "o_prob": result.o_prob.numpy(),
        })
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
