"""Stage one: run every teacher once over a split and cache its artefacts in a Zarr store.

The work is done block by block (one block = one shard per view). One DataLoader streams
the pending blocks' images, each decoded once and rendered in each of its K views
(pipeline.views) at every distinct teacher input size; every teacher that has not finished
a block runs on every view of its batches, and the block is marked finished per teacher
only after its arrays are written. Nothing larger than a block is held.
"""

import numpy as np
import torch
from tqdm import tqdm

from pipeline.cache import TeacherStore, default_block_size, quantize_cam, topk_logit_fields
from pipeline.config import ExtractConfig
from pipeline.data import Dataset, Geometry, UnreadableImage, get_dataset, normalize
from pipeline.devices import autocast, prepare_model, resolve_device, to_device
from pipeline.errors import PipelineError
from pipeline.explain import explain
from pipeline.teachers import Teacher, load_teacher, parse_target_layers
from pipeline.views import ViewPolicy, render


class ExtractionImages(torch.utils.data.Dataset):
    """Sample i -> (per geometry, its K views as uint8 (K, h, w, C); the views' (K, 4) boxes and (K,)
    flips; label; error text, or "" when the image is readable)."""

    def __init__(self, dataset: Dataset, geometries: list[Geometry | None], views: ViewPolicy, skip_corrupt: bool):
        self.dataset, self.geometries, self.views, self.skip_corrupt = dataset, geometries, views, skip_corrupt
        height, width, self.channels = dataset.info.image_shape
        self.sizes = [((g.crop, g.crop), g.interpolation) if g else ((height, width), "bilinear") for g in geometries]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        label = int(self.dataset.labels[index])
        try:
            source = self.dataset.source_image(index)
        except UnreadableImage as error:  # reported by the main process, one line, never a worker traceback
            blank = tuple(np.zeros((self.views.count, *size, self.channels), np.uint8) for size, _ in self.sizes)
            return blank, np.zeros((self.views.count, 4), np.int32), np.zeros(self.views.count, bool), label, str(error)
        boxes, flips = self.views.boxes(self.dataset.sample_id(index), *source.shape[1:])
        images = tuple(np.stack([render(source, box, flip, size, interpolation) for box, flip in zip(boxes, flips)])
                       for size, interpolation in self.sizes)
        return images, boxes, flips, label, ""


def block_batches(store: TeacherStore, blocks: list[int], batch_size: int) -> list[tuple[int, list[int]]]:
    """(block, row indices) per batch, in block order; no batch spans two blocks."""
    batches = []
    for block in blocks:
        start, stop = store.block_rows(block)
        batches += [(block, list(range(s, min(s + batch_size, stop)))) for s in range(start, stop, batch_size)]
    return batches


def run(cfg: ExtractConfig) -> TeacherStore:
    dataset = get_dataset(cfg.dataset, cfg.split, cfg.data_root, cfg.split_seed, cfg.download)
    info = dataset.info
    layers = parse_target_layers(cfg.target_layer)
    teachers = [load_teacher(spec, info, layers, cfg.split_seed) for spec in cfg.teachers]
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise PipelineError(f"teacher names must be unique, got {', '.join(names)}")
    if set(layers) - set(names):
        raise PipelineError(f"--target-layer names unknown teacher(s) {', '.join(sorted(set(layers) - set(names)))}; "
                            f"teachers are: {', '.join(names)}")
    logits = cfg.logits_mode()
    views = ViewPolicy.of(info, cfg.views, cfg.view_seed, cfg.view_shift)
    if logits["mode"] == "topk" and logits["k"] >= info.num_classes:
        raise PipelineError(f"--logits topk:{logits['k']} keeps every one of the {info.num_classes} classes; "
                            "use --logits full or a smaller K")
    device = resolve_device(cfg.device)
    replace = cfg.on_change == "replace"
    with TeacherStore.locked(cfg.store):  # parallel extractors of one store create it once
        store = TeacherStore.create(
            cfg.store, dataset.identity(), dataset.labels, getattr(dataset, "images", None), target=cfg.target,
            block_size=cfg.block_size or default_block_size(len(dataset)), logits=logits, replace=replace,
            views=views,
        )
        for name in set(store.teachers) - set(names) if replace else ():
            print(f"dropping teacher {name} from {store.path}: not among --teachers (--on-change replace)")
            store.drop_teacher(name)
        for t in teachers:
            store.add_teacher(t.name, t.identity, replace=replace)
    part, parts = cfg.block_part()
    pending = {t.name: {b for b in store.pending_blocks(t.name) if b % parts == part} for t in teachers}
    blocks = sorted(set().union(*pending.values()))
    print(f"store {store.path}: {len(blocks)} of {store.num_blocks} blocks to extract"
          + (f" (part {cfg.blocks})" if cfg.blocks else "") + f" on {device}")
    geometries = list(dict.fromkeys(t.geometry for t in teachers))
    batches = block_batches(store, blocks, cfg.batch_size)
    loader = torch.utils.data.DataLoader(
        ExtractionImages(dataset, geometries, views, cfg.skip_corrupt), batch_sampler=[rows for _, rows in batches],
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
    )
    for t in teachers:
        t.model = prepare_model(t.model, device)
    parts_of: dict[str, list] = {t.name: [] for t in teachers}
    sample_parts: list[dict] = []
    with tqdm(total=len(blocks), desc=f"extract {cfg.split} ({len(teachers)} teachers, {views.count} "
              f"view{'s' * (views.count > 1)})", unit="block") as progress:
        for (block, rows), (images, boxes, flips, labels, errors) in zip(batches, loader):
            sample_parts.append({"valid": check_readable(dataset, rows, errors, cfg.skip_corrupt),
                                 "view_boxes": boxes.numpy(), "view_flips": flips.numpy()})
            for t in teachers:
                if block in pending[t.name]:
                    seen = images[geometries.index(t.geometry)]  # (B, K, h, w, C)
                    each = [explain_batch(t, seen[:, v], labels, cfg.target, device) for v in range(views.count)]
                    parts_of[t.name].append({key: np.stack([e[key] for e in each], 1) for key in each[0]})
            if rows[-1] + 1 == store.block_rows(block)[1]:  # the block's last batch: write it
                samples = {key: np.concatenate([p[key] for p in sample_parts]) for key in sample_parts[0]}
                write_block(store, block, samples, parts_of, logits)
                parts_of, sample_parts = {t.name: [] for t in teachers}, []
                progress.update()
    return store


def write_block(store: TeacherStore, block: int, samples: dict[str, np.ndarray], parts_of: dict[str, list],
                logits: dict) -> None:
    """The valid mask and the views first, then each teacher's rows (which marks the block finished
    for it); rows of unreadable images hold zeros."""
    store.write_samples(block, samples)
    valid = samples["valid"]
    for name, parts in parts_of.items():
        if parts:
            arrays = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
            arrays |= as_logit_fields(arrays.pop("logits"), logits)
            for values in arrays.values():
                values[~valid] = 0
            store.write_block(name, block, arrays)


def check_readable(dataset: Dataset, rows: list[int], errors: tuple[str, ...], skip_corrupt: bool) -> np.ndarray:
    """The batch's valid mask; the first unreadable image stops the run unless --skip-corrupt."""
    bad = [(row, error) for row, error in zip(rows, errors) if error]
    if bad and not skip_corrupt:
        raise PipelineError(bad[0][1])
    for row, _ in bad:
        tqdm.write(f"skipped unreadable image {dataset.describe(row)} (row {row}, recorded as valid = False)")
    return np.array([not error for error in errors], dtype=bool)


def explain_batch(teacher: Teacher, images: torch.Tensor, labels: torch.Tensor, target: str,
                  device: torch.device) -> dict[str, np.ndarray]:
    mean, std = teacher.transform.mean, teacher.transform.std
    x = to_device(normalize(images.to(device, non_blocking=True), mean, std), device)
    with autocast(device):
        result = explain(teacher.model, teacher.layer, x, labels.to(device), target, mean, std)
    cam_u8, cam_max = quantize_cam(result.cam.float())
    attention_u8, attention_max = quantize_cam(result.attention)
    return {"logits": result.logits.float().cpu().numpy(), "cam": cam_u8, "cam_max": cam_max,
            "cam_class": result.target.cpu().numpy(),
            "y_prob": result.y_prob.float().cpu().numpy(), "o_prob": result.o_prob.float().cpu().numpy(),
            "attention": attention_u8, "attention_max": attention_max}


def as_logit_fields(logits: np.ndarray, mode: dict) -> dict[str, np.ndarray]:
    """float32 logits (B, K, C) -> the store's logit arrays for its mode (float16 values)."""
    logits = torch.from_numpy(logits)
    if mode["mode"] == "full":
        return {"logits": logits.half().numpy()}
    fields = topk_logit_fields(logits.flatten(0, 1), mode["k"])
    return {key: values.reshape(*logits.shape[:2], *values.shape[1:]) for key, values in fields.items()}
