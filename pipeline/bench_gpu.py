"""`pipeline bench --only gpu`, end to end: stage one from JPEG files, how far its pixels and choices move,
and the student's step with and without capture.

Stage one runs as `extract-teachers` runs it (loader workers, store writes) over a folder of
fabricated photo-sized JPEGs with three torchvision teachers of random weights and three views
per image, once decoding on the GPU (`--decode gpu`) and once with Pillow in the workers; the
compute-only rate is the same teachers' batch work on views already on the GPU. The two stores
then say how many per-sample choices (the lowest confidence drop) the decoders' pixel
differences move. The student's step is timed with its batch already on the device, so no
loader hides it. Each function takes the device, so the section's code runs on the CPU too.
"""

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image

from pipeline.bench import Figure, median_seconds, sync
from pipeline.config import ExtractConfig
from pipeline.data import get_dataset
from pipeline.data.files import ImageFile
from pipeline.device_views import DeviceDecoder, read_encoded
from pipeline.devices import autocast, prepare_model
from pipeline.distill import DistillationLoss, LossSettings
from pipeline.explain import CamLayer, probe_input
from pipeline.extraction import Extraction, explain_batch, pending_work
from pipeline.fabricate import make_torchvision_teacher
from pipeline.methods import method_of
from pipeline.models import create_model
from pipeline.objective import loss_of
from pipeline.policies import PerSample
from pipeline.scoring import best_explainer
from pipeline.store.teacher_store import TeacherStore
from pipeline.teachers import load_teacher
from pipeline.views import ViewPolicy


@dataclass(frozen=True)
class GpuScale:
    """The sizes of the section: `full` for the figures the docs show, `quick` to check that it runs."""

    photos: int  # JPEGs in the folder
    photo_size: tuple[int, int]  # (width, height), ImageNet's most common
    classes: int
    teachers: tuple[str, ...]  # torchvision architectures
    views: int
    batch: int  # stage one's
    student_batch: int
    steps: int  # student steps per timed run
    repeats: int
    resnet_side: int  # the torchvision student's input side


FULL_GPU = GpuScale(1024, (500, 375), 10, ("resnet50", "densenet121", "vgg16_bn"), 3, 128, 64, 20, 5, 224)
QUICK_GPU = GpuScale(12, (120, 90), 4, ("resnet18", "densenet121"), 2, 4, 8, 2, 1, 64)
SCALES = {"full": FULL_GPU, "quick": QUICK_GPU}


def make_photos(root: Path, scale: GpuScale) -> Path:
    """An `imagefolder` tree of `scale.photos` JPEGs at quality 90 (smooth colour fields with noise, so that
    they compress as photos do, about 40 to 60 KB at 500 x 375)."""
    rng = np.random.default_rng(0)
    width, height = scale.photo_size
    for i in range(scale.photos):
        folder = root / "train" / f"c{i % scale.classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                         Image.BICUBIC)
        noisy = np.asarray(coarse).astype(np.int16) + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.JPEG", quality=90)
    return root


def extraction_seconds(cfg: ExtractConfig, device: torch.device) -> float:
    """Seconds stage one takes over every block of a new store (loading the teachers and creating the store
    not counted): reading, decoding, the teachers' work and the store's writes."""
    extraction = Extraction.load(cfg)
    store = extraction.open_store(cfg, lambda new: {})
    with pending_work(cfg, extraction, store, f"on {device}") as (pending, progress):
        began = time.perf_counter()
        extraction.extract(store, pending, cfg, device, lambda block: progress.update())
        return time.perf_counter() - began


def choices(store: TeacherStore) -> np.ndarray:
    """(N, K) the teacher of the lowest confidence drop, per sample and view."""
    y, o = (np.stack([store.group[f"teachers/{t}/{key}"][...] for t in store.teachers], -1) for key in ("y_prob", "o_prob"))
    flat = best_explainer(torch.from_numpy(y.reshape(-1, y.shape[-1])), torch.from_numpy(o.reshape(-1, o.shape[-1])))
    return flat.numpy().reshape(y.shape[:-1])


def stage_one_figures(folder: Path, scale: GpuScale, device: torch.device) -> list[Figure]:
    root = make_photos(folder / "photos", scale)
    dataset = f"imagefolder:{root}"
    classes = get_dataset(dataset, "train").info.num_classes
    checkpoints = [str(make_torchvision_teacher(folder / f"{arch}.pt", arch, classes, seed=i))
                   for i, arch in enumerate(scale.teachers)]
    workers = min(16, os.cpu_count() or 1)
    common = {"dataset": dataset, "teachers": checkpoints, "views": scale.views, "batch_size": scale.batch,
              "block_size": max(scale.batch, scale.photos // 8), "device": device.type}
    seconds = {}
    for decode in ("gpu", "cpu"):
        for run, part in (("warm-up", "1/8"), ("timed", None)):  # a block first: cuDNN's autotuning, the allocator
            cfg = ExtractConfig(**common, decode=decode, num_workers=workers, blocks=part,
                                store=str(folder / f"{decode}-{run}.zarr"))
            seconds[decode] = extraction_seconds(cfg, device)
    stores = {decode: TeacherStore.open(folder / f"{decode}-timed.zarr") for decode in ("gpu", "cpu")}
    moved = float((choices(stores["gpu"]) != choices(stores["cpu"])).mean())

    info = get_dataset(dataset, "train").info
    teachers = [load_teacher(path, info) for path in checkpoints]
    for teacher in teachers:
        teacher.model = prepare_model(teacher.model, device)
    views, pixels = device_views_of(root, dataset, scale, device)
    labels = torch.randint(0, classes, (len(views),))

    def compute():
        for teacher in teachers:
            for v in range(scale.views):
                explain_batch(teacher, views[:, v], labels, "label", device)
        sync(device)

    compute_rate = len(views) / median_seconds({"compute": compute}, scale.repeats)["compute"]
    gpu_rate, cpu_rate = (scale.photos / seconds[decode] for decode in ("gpu", "cpu"))
    flips = bf16_flips(teachers, views[:, 0], labels, device)
    archs = ", ".join(scale.teachers)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return [
        Figure(f"stage one end to end, --decode gpu, images/s ({scale.photos} JPEGs {scale.photo_size[0]}x"
               f"{scale.photo_size[1]} q90, {archs}, {scale.views} views, store writes; {where})", gpu_rate,
               f"compute only {compute_rate:,.0f}; --decode cpu ({workers} workers) {cpu_rate:,.0f}",
               ">= 0.8x compute only", gpu_rate >= 0.8 * compute_rate),
        Figure("views cut on the device vs Pillow's (same boxes): largest / mean difference, levels of 255",
               f"{pixels[0]} / {pixels[1]:.3f}"),
        Figure("per-sample choices (lowest drop, every view) that --decode gpu moves against --decode cpu, %",
               100 * moved),
        Figure(f"per-sample choices that bf16 autocast moves against float32, % ({archs}, view 0)", 100 * flips),
    ]


def device_views_of(root: Path, dataset: str, scale: GpuScale, device: torch.device) -> tuple[torch.Tensor, tuple]:
    """Up to one stage-one batch of the photos' views, cut on the device at 224 px as --decode gpu cuts them,
    and (largest, mean) level difference from Pillow's views of the same boxes."""
    data = get_dataset(dataset, "train")
    policy = ViewPolicy.of(data.info, scale.views, decode="gpu")
    rows = range(min(scale.batch, len(data)))
    files = [ImageFile(data.path(i), draft=False) for i in rows]
    boxes, flips = zip(*(policy.boxes(data.sample_id(i), f.height, f.width) for i, f in zip(rows, files)))
    size = (data.info.geometry.crop,) * 2
    (views,), _ = DeviceDecoder(device).views([read_encoded(f) for f in files],
                                              torch.tensor(np.stack(boxes)), torch.tensor(np.stack(flips)),
                                              [(size, data.info.geometry.interpolation)], [""] * len(files))
    pillow = torch.from_numpy(np.stack([[f.view(box, bool(flip), size) for box, flip in zip(bs, fs)]
                                        for f, bs, fs in zip(files, boxes, flips)]))
    difference = (views.cpu().int() - pillow.int()).abs()
    return views, (int(difference.max()), float(difference.float().mean()))


def bf16_flips(teachers, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    """The share of samples whose lowest-drop teacher differs between bf16 autocast (the GPU's default) and
    float32."""
    def chosen():
        outputs = [explain_batch(t, images, labels, "label", device) for t in teachers]
        y, o = (torch.from_numpy(np.stack([out[key] for out in outputs], 1)) for key in ("y_prob", "o_prob"))
        return best_explainer(y, o)

    bf16 = chosen()
    with mock.patch("pipeline.teachers.autocast", lambda device: contextlib.nullcontext()):
        float32 = chosen()
    return float((bf16 != float32).float().mean())


# -- the student's step --------------------------------------------------------------------------


def step_loop(loss_fn: DistillationLoss, student: torch.nn.Module, batch: dict, device: torch.device, steps: int):
    """`steps` of fit()'s step (bf16 autocast on CUDA, SGD) on one batch already on the device."""
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def run():
        for _ in range(steps):
            with autocast(device):
                terms = loss_fn(student, batch)
            optimizer.zero_grad(set_to_none=True)
            loss_of(terms).backward()
            optimizer.step()
        sync(device)

    return run


def synthetic_rows(batch: int, side: int, channels: int, classes: int, map_side: int, teachers: list[str],
                   device: torch.device) -> dict:
    """A batch of stage two's rows on the device: images, labels and each teacher's cached values."""
    generator = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    rows = {"images": torch.randint(0, 256, (batch, side, side, channels), dtype=torch.uint8, generator=generator),
            "labels": torch.randint(0, classes, (batch,), generator=generator), "index": torch.arange(batch)}
    for name in teachers:
        y = rand(batch)
        rows |= {f"teachers/{name}/logits": (torch.randn(batch, classes, generator=generator) * 3).half(),
                 f"teachers/{name}/y_prob": y, f"teachers/{name}/o_prob": y * rand(batch),
                 f"teachers/{name}/cam": torch.randint(0, 256, (batch, map_side, map_side), dtype=torch.uint8,
                                                      generator=generator),
                 f"teachers/{name}/cam_max": rand(batch) + 0.5,
                 f"teachers/{name}/attention": torch.randint(0, 256, (batch, map_side, map_side), dtype=torch.uint8,
                                                            generator=generator),
                 f"teachers/{name}/attention_max": rand(batch) + 0.5}
    return {key: value.to(device) for key, value in rows.items()}


def step_figures(scale: GpuScale, device: torch.device) -> list[Figure]:
    """explain-kd's step with a map term (attention map, beta 0.5, the first teacher's logits: the costliest
    step a captured run can take) over ce's,
    uncaptured and captured (--compile), for the digits student and a torchvision resnet18."""
    students = {"resnet8_slim, digits 32 px": ("resnet8_slim", 32, 1, 10, 8, 1.15),
                f"torchvision resnet18, {scale.resnet_side} px": ("torchvision:resnet18", scale.resnet_side, 3, 1000, 7,
                                                                  1.05)}
    teachers = ["t0", "t1", "t2"]
    figures = []
    for name, (arch, side, channels, classes, map_side, goal) in students.items():
        batch = synthetic_rows(scale.student_batch, side, channels, classes, map_side, teachers, device)
        runs, capture_seconds = {}, {}
        for method in ("ce", "explain-kd"):
            for captured in (False, True):
                torch.manual_seed(0)
                student = prepare_model(create_model(arch, channels, classes), device)
                layer = CamLayer.of(student.eval(), probe_input((side, side, channels)).to(device))
                student.train()
                settings = LossSettings(beta=0.5, student_map="attention") if method == "explain-kd" else LossSettings()
                loss_fn = DistillationLoss(method_of(method), teachers, layer,
                                           (0.5,) * channels, (0.25,) * channels, classes, settings,
                                           kd_teacher=teachers[0] if method == "explain-kd" else None,
                                           policy=policy_of(method))
                key = f"{method}{' captured' if captured else ''}"
                if captured:
                    loss_fn.capture(device, scale.student_batch)
                    began = time.perf_counter()
                    step_loop(loss_fn, student, batch, device, 2)()  # the capture, then a replay
                    capture_seconds[method] = time.perf_counter() - began
                runs[key] = step_loop(loss_fn, student, batch, device, scale.steps)
        ms = {key: 1000 * s / scale.steps for key, s in median_seconds(runs, scale.repeats).items()}
        for captured in ("", " captured"):
            ratio = ms[f"explain-kd{captured}"] / ms[f"ce{captured}"]
            figures.append(Figure(
                f"student step explain-kd / ce{captured or ', uncaptured'} ({name}, batch {scale.student_batch}, "
                f"on the device)", ratio, f"ce {ms['ce' + captured]:.2f} ms, explain-kd {ms['explain-kd' + captured]:.2f}"
                + (f"; capture {capture_seconds['ce']:.0f} s and {capture_seconds['explain-kd']:.0f} s" if captured else ""),
                f"<= {goal}", ratio <= goal))
        figures.append(Figure(f"student step, captured / uncaptured, ce and explain-kd ({name})",
                              f"{ms['ce captured'] / ms['ce']:.2f} and {ms['explain-kd captured'] / ms['explain-kd']:.2f}"))
    return figures


def policy_of(method: str) -> PerSample | None:
    return PerSample() if method_of(method).follows_policy else None
