"""Stage one: run every teacher once over a split and cache its artefacts in a teacher store.

The work is done block by block (one block = one shard per view). One DataLoader streams
the pending blocks' images, each decoded once per JPEG draft scale its views need and
rendered in each of its K views (pipeline.views) at every distinct teacher input size; every
teacher that has not finished a block runs on every view of its batches, and the block is
marked finished per teacher only after its arrays are written. Nothing larger than a block
is held. With --scheduler, each block is a dask task (pipeline.cluster).
"""

import dataclasses
import json
import multiprocessing
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import ExtractConfig
from pipeline.data import Dataset, Geometry, UnreadableImage, get_dataset, get_val_split
from pipeline.device_views import DeviceDecoder, read_encoded, require_cuda
from pipeline.devices import prepare_model, resolve_device
from pipeline.errors import PipelineError
from pipeline.heldout import judge
from pipeline.store.codec import quantize_cam, topk_logit_fields
from pipeline.store.teacher_store import TeacherStore, default_block_size
from pipeline.teachers import Teacher, load_teacher, parse_target_layers, teacher_outputs
from pipeline.views import ViewPolicy, decodes_on_gpu


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
            source = self.dataset.view_source(index, self.views.draft)
            boxes, flips = self.views.boxes(self.dataset.sample_id(index), source.height, source.width)
            images = tuple(np.stack([source.view(box, flip, size, interpolation) for box, flip in zip(boxes, flips)])
                           for size, interpolation in self.sizes)
        except UnreadableImage as error:  # reported by the main process, one line, never a worker traceback
            blank = tuple(np.zeros((self.views.count, *size, self.channels), np.uint8) for size, _ in self.sizes)
            return blank, np.zeros((self.views.count, 4), np.int32), np.zeros(self.views.count, bool), label, str(error)
        return images, boxes, flips, label, ""


GPU_FIX = "run on a machine with one (--device cuda), or pass --decode cpu"


class ExtractionFiles(torch.utils.data.Dataset):
    """Sample i -> (its file's bytes and size as an EncodedImage, or None; the views' (K, 4) boxes and (K,)
    flips; label; error text, or "" when the header is readable): for views decoded on the device."""

    def __init__(self, dataset: Dataset, views: ViewPolicy):
        self.dataset, self.views = dataset, views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        label = int(self.dataset.labels[index])
        try:
            source = self.dataset.view_source(index)
            boxes, flips = self.views.boxes(self.dataset.sample_id(index), source.height, source.width)
            return read_encoded(source), boxes, flips, label, ""
        except UnreadableImage as error:
            return None, np.zeros((self.views.count, 4), np.int32), np.zeros(self.views.count, bool), label, str(error)


def collate_files(samples: list[tuple]) -> tuple:
    """ExtractionFiles' samples -> (encoded images, boxes (B, K, 4), flips (B, K), labels, errors)."""
    encoded, boxes, flips, labels, errors = zip(*samples)
    return (list(encoded), torch.from_numpy(np.stack(boxes)), torch.from_numpy(np.stack(flips)),
            torch.tensor(labels), list(errors))


def block_batches(store: TeacherStore, blocks: list[int], batch_size: int) -> list[tuple[int, list[int]]]:
    """(block, row indices) per batch, in block order; no batch spans two blocks."""
    batches = []
    for block in blocks:
        start, stop = store.block_rows(block)
        batches += [(block, list(range(s, min(s + batch_size, stop)))) for s in range(start, stop, batch_size)]
    return batches


@dataclass
class Extraction:
    """What stage one runs: the data set, its teachers (loaded and checked), the view policy and the
    logits mode. Built by the process that owns the command and again by every dask worker."""

    dataset: Dataset
    teachers: list[Teacher]
    views: ViewPolicy
    logits: dict
    heldout: Dataset | None  # the split students validate on, where teachers are judged (pipeline.heldout)

    @classmethod
    def load(cls, cfg: ExtractConfig) -> "Extraction":
        dataset = get_dataset(cfg.dataset, cfg.split, cfg.data_root, cfg.split_seed, cfg.download)
        heldout = get_val_split(cfg.dataset, cfg.data_root, cfg.split_seed, cfg.download)
        info = dataset.info
        layers = parse_target_layers(cfg.target_layer)
        teachers = [load_teacher(spec, info, layers, cfg.split_seed, heldout and heldout.identity())
                    for spec in cfg.teachers]
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise PipelineError(f"teacher names must be unique, got {', '.join(names)}")
        if set(layers) - set(names):
            raise PipelineError(f"--target-layer names unknown teacher(s) {', '.join(sorted(set(layers) - set(names)))}; "
                                f"teachers are: {', '.join(names)}")
        logits = cfg.logits_mode()
        views = ViewPolicy.of(info, cfg.views, cfg.view_seed, cfg.view_shift, cfg.jpeg_draft, cfg.decode)
        if logits["mode"] == "topk" and logits["k"] >= info.num_classes:
            raise PipelineError(f"--logits topk:{logits['k']} keeps every one of the {info.num_classes} classes; "
                                "use --logits full or a smaller K")
        return cls(dataset, teachers, views, logits, heldout)

    def open_store(self, cfg: ExtractConfig, judge_new: Callable[[list[Teacher]], dict[str, dict]]) -> TeacherStore:
        """The store, created (or checked) and every teacher registered in it, judged first by `judge_new` on the
        held-out split (once, when it is registered; a changed teacher is refused before it is judged)."""
        replace = cfg.on_change == "replace"
        with TeacherStore.locked(cfg.store):  # parallel extractors of one store create it once
            store = TeacherStore.create(
                cfg.store, self.dataset.identity(), self.dataset.labels, getattr(self.dataset, "images", None),
                target=cfg.target, block_size=self.block_size(cfg), logits=self.logits, replace=replace,
                views=self.views,
            )
            names = [t.name for t in self.teachers]
            for name in set(store.teachers) - set(names) if replace else ():
                print(f"dropping teacher {name} from {store.location}: not among --teachers (--on-change replace)")
                store.drop_teacher(name)
            new = [t for t in self.teachers if not store.holds(t.name, t.identity)]
            for t in new:
                store.check_teacher(t.name, t.identity, replace)
            judged = judge_new(new) if new and self.heldout is not None else {}
            for t in new:
                if judged.get(t.name):
                    print(f"teacher {t.name} on the {judged[t.name]['samples']} held-out {judged[t.name]['split']} "
                          f"images: top-1 {judged[t.name]['top1']:.4f}, mean confidence drop "
                          f"{judged[t.name]['mean_drop']:.4f}")
                store.add_teacher(t.name, t.identity | {"heldout": judged.get(t.name)}, replace=replace)
        return store

    def judge(self, teacher: Teacher, cfg: ExtractConfig, device: torch.device) -> dict:
        """The teacher's top-1 and mean drop on the held-out split, run on `device`."""
        teacher.model = prepare_model(teacher.model, device)
        return judge(teacher.name, lambda images, labels: teacher_outputs(teacher, images, labels, cfg.target, device),
                     self.heldout, teacher.geometry, cfg.batch_size, cfg.skip_corrupt)

    def block_size(self, cfg: ExtractConfig) -> int:
        return cfg.block_size or default_block_size(len(self.dataset))

    def check_store(self, cfg: ExtractConfig) -> TeacherStore:
        """The store another process created, checked to be made from this process's data and settings
        and to hold its teachers (a worker that mounts other files or weights stops)."""
        store = TeacherStore.open(cfg.store, mode="r+")
        store.check_made_from(TeacherStore.record(self.dataset.identity(), cfg.target, self.block_size(cfg),
                                                  self.logits, self.views))
        for t in self.teachers:
            store.add_teacher(t.name, t.identity)  # registered already: returns, or names what differs
        return store

    def extract(self, store: TeacherStore, pending: dict[str, set[int]], cfg: ExtractConfig, device: torch.device,
                on_block=lambda block: None, say=tqdm.write) -> None:
        """Run every teacher over its pending blocks and write them, calling `on_block` after each."""
        blocks = sorted(set().union(*pending.values()))
        geometries = list(dict.fromkeys(t.geometry for t in self.teachers))
        batches = block_batches(store, blocks, cfg.batch_size)
        images_of = ExtractionImages(self.dataset, geometries, self.views, cfg.skip_corrupt)
        decoder = None
        if decodes_on_gpu(self.views.decoder):  # workers read bytes; this process decodes and cuts on the device
            require_cuda(device, "--decode gpu decodes", GPU_FIX)
            decoder = DeviceDecoder(device, say)
        loader = torch.utils.data.DataLoader(
            ExtractionFiles(self.dataset, self.views) if decoder else images_of,
            batch_sampler=[rows for _, rows in batches], num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda" and decoder is None, collate_fn=collate_files if decoder else None,
        )
        for t in self.teachers:
            t.model = prepare_model(t.model, device)
        parts_of: dict[str, list] = {t.name: [] for t in self.teachers}
        sample_parts: list[dict] = []
        for (block, rows), (images, boxes, flips, labels, errors) in zip(batches, loader):
            if decoder:
                images, errors = decoder.views(images, boxes, flips, images_of.sizes, errors)
            sample_parts.append({"valid": check_readable(self.dataset, rows, errors, cfg.skip_corrupt, say),
                                 "view_boxes": boxes.numpy(), "view_flips": flips.numpy()})
            for t in self.teachers:
                if block in pending[t.name]:
                    seen = images[geometries.index(t.geometry)]  # (B, K, h, w, C)
                    each = [explain_batch(t, seen[:, v], labels, cfg.target, device) for v in range(self.views.count)]
                    parts_of[t.name].append({key: np.stack([e[key] for e in each], 1) for key in each[0]})
            if rows[-1] + 1 == store.block_rows(block)[1]:  # the block's last batch: write it
                samples = {key: np.concatenate([p[key] for p in sample_parts]) for key in sample_parts[0]}
                write_block(store, block, samples, parts_of, self.logits)
                parts_of, sample_parts = {t.name: [] for t in self.teachers}, []
                on_block(block)


MIN_MAP_SIDE = 4  # a coarser map says little about where the evidence is


def describe_layers(teachers: list[Teacher]) -> None:
    """Each teacher's Grad-CAM layer and map size, with a warning for maps too coarse to locate anything (a
    network whose last maps pool to 1x1 at this input size falls back to an earlier layer)."""
    for t in teachers:
        h, w = t.identity["map_shape"]
        print(f"teacher {t.name}: Grad-CAM at {t.layer.target_layer} ({t.layer.path}), maps {h}x{w}")
        if min(h, w) < MIN_MAP_SIDE:
            print(f"warning: teacher {t.name}'s maps are only {h}x{w} (layer {t.layer.target_layer}); name a layer "
                  f"with larger maps with --target-layer {t.name}=<module.path>, or feed larger images")


def extract_teachers(cfg: ExtractConfig) -> TeacherStore:
    """Stage one, whole: load the data set and teachers, create or resume the store, judge and register every
    new teacher, and extract every pending block (here, or on dask with --scheduler)."""
    if cfg.decode == "gpu" and not cfg.scheduler:  # before anything loads (dask workers check their own devices)
        require_cuda(resolve_device(cfg.device), "--decode gpu decodes", GPU_FIX)
    extraction = Extraction.load(cfg)
    describe_layers(extraction.teachers)
    if cfg.scheduler:
        from pipeline.cluster import Cluster  # dask is imported only for --scheduler

        with Cluster(cfg.scheduler) as cluster:  # teachers are judged and blocks extracted on its workers' devices
            store = extraction.open_store(cfg, lambda new: cluster.judge(judge_on_worker, cfg, [t.name for t in new]))
            with pending_work(cfg, extraction, store, f"on dask ({cfg.scheduler})") as (pending, progress):
                identity = {"store": store.attrs["fingerprint"],
                            "teachers": {n: store.teacher_attrs(n)["fingerprint"] for n in pending}}
                cluster.run_blocks(extract_on_worker, cfg, pending, identity, progress)
        return store
    device = resolve_device(cfg.device)
    store = extraction.open_store(cfg, lambda new: {t.name: extraction.judge(t, cfg, device) for t in new})
    with pending_work(cfg, extraction, store, f"on {device}") as (pending, progress):
        extraction.extract(store, pending, cfg, device, lambda block: progress.update())
    return store


@contextmanager
def pending_work(cfg: ExtractConfig, extraction: Extraction, store: TeacherStore, where: str):
    """The blocks each teacher has still to extract in this process's part, said, and a progress bar over them."""
    part, parts = cfg.block_part()
    pending = {t.name: {b for b in store.pending_blocks(t.name) if b % parts == part} for t in extraction.teachers}
    blocks = sorted(set().union(*pending.values()))
    print(f"store {store.location}: {len(blocks)} of {store.num_blocks} blocks to extract"
          + (f" (part {cfg.blocks})" if cfg.blocks else "") + f" {where}")
    views = extraction.views.count
    with tqdm(total=len(blocks), desc=f"extract {cfg.split} ({len(extraction.teachers)} teachers, {views} "
              f"view{'s' * (views > 1)})", unit="block") as progress:
        yield pending, progress


def judge_on_worker(cfg: ExtractConfig, name: str) -> dict:
    """A dask task: teacher `name` judged on the held-out split on this worker's device (the client may have
    no GPU), with the data set and teachers this worker loaded for the job's judging."""
    from pipeline.cluster import worker_device, worker_state

    key = "judge " + json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    extraction = worker_state(key, lambda: Extraction.load(dataclasses.replace(cfg, download=False)))
    teacher = next(t for t in extraction.teachers if t.name == name)
    return extraction.judge(teacher, cfg, worker_device(cfg.device))


def extract_on_worker(cfg: ExtractConfig, key: str, block: int, teachers: list[str]) -> list[str]:
    """A dask task: extract `block` for `teachers` in this worker process, with the data set, teachers and
    store it loaded and checked for its first task of job `key` (kept for the next), writing straight
    into the store. Returns the messages it would have printed (skipped images), for the client."""
    from pipeline.cluster import worker_device, worker_state

    if cfg.num_workers and multiprocessing.current_process().daemon:
        raise PipelineError(f"--num-workers {cfg.num_workers}: this dask worker is a daemonic process, which cannot "
                            "start DataLoader workers; start the workers with DASK_DISTRIBUTED__WORKER__DAEMON=False, "
                            "or pass --num-workers 0")
    def load() -> tuple[Extraction, TeacherStore]:
        extraction = Extraction.load(dataclasses.replace(cfg, download=False))  # the client downloaded it
        return extraction, extraction.check_store(cfg)

    extraction, store = worker_state(key, load)
    said: list[str] = []
    extraction.extract(store, {t.name: {block} if t.name in teachers else set() for t in extraction.teachers},
                       cfg, worker_device(cfg.device), say=said.append)
    return said


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


def check_readable(dataset: Dataset, rows: list[int], errors: tuple[str, ...], skip_corrupt: bool,
                   say=tqdm.write) -> np.ndarray:
    """The batch's valid mask; the first unreadable image stops the run unless --skip-corrupt."""
    bad = [(row, error) for row, error in zip(rows, errors) if error]
    if bad and not skip_corrupt:
        raise PipelineError(bad[0][1])
    for row, _ in bad:
        say(f"skipped unreadable image {dataset.describe(row)} (row {row}, recorded as valid = False)")
    return np.array([not error for error in errors], dtype=bool)


def explain_batch(teacher: Teacher, images: torch.Tensor, labels: torch.Tensor, target: str,
                  device: torch.device) -> dict[str, np.ndarray]:
    """What the store holds of a batch: `teacher_outputs` with its maps quantised."""
    result = teacher_outputs(teacher, images, labels, target, device)
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
