"""`pipeline bench`: the project's speed and size figures, each against a peer measured in the same run.

Every time is the median of `repeats` timed runs after one warm-up run (`--quick`, which only checks
that every figure is measured, skips it), and the setups that a ratio compares take turns, so that a
change of machine load affects them alike. Stores are synthetic (random values of the real shapes and
dtypes) unless a figure says otherwise; teachers have random weights (no weights can be downloaded
here), which changes no timing.
"""

import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from pipeline.config import BENCH_SECTIONS, ExtractConfig
from pipeline.data import get_dataset, normalize
from pipeline.devices import autocast, prepare_model, resolve_device, to_device
from pipeline.distill import DistillationLoss, LossSettings
from pipeline.errors import PipelineError
from pipeline.explain import CamLayer, explain, module_path, probe_input
from pipeline.extraction import explain_batch, extract_teachers
from pipeline.fabricate import make_cifar, make_teacher
from pipeline.methods import method_of
from pipeline.models import create_model
from pipeline.objective import loss_of
from pipeline.policies import PerSample
from pipeline.store.codec import quantize_cam, topk_logit_fields
from pipeline.store.teacher_store import TeacherStore, default_block_size
from pipeline.stream import BlockStream
from pipeline.student import train_student
from pipeline.student_config import TrainStudentConfig
from pipeline.teachers import Teacher, Transform

TEACHERS = ("t0", "t1", "t2")
DIGITS_TEACHERS = ("resnet20", "wrn16_2", "vgg8_bn")  # the default pipeline's teachers


@dataclass
class Figure:
    figure: str
    value: float | str
    peer: str = "-"
    goal: str = "-"
    met: bool | None = None  # None: a figure to report, no goal

    def cells(self) -> list[str]:
        value = f"{self.value:,.3g}" if isinstance(self.value, float) and self.value < 100 else (
            f"{self.value:,.0f}" if isinstance(self.value, float) else str(self.value))
        return [self.figure, value, self.peer, self.goal, {True: "yes", False: "**no**", None: "-"}[self.met]]


@dataclass
class Scale:
    """How big each measurement is: `full` for the figures docs/performance.md shows, `quick` to check it all runs."""

    reader_samples: int
    reader_block: int
    per_sample_files: int
    student_epochs: int
    digits_split: str  # the student runs' and the online step's digits store: `quick` takes the small test split
    student_repeats: int  # whole runs vary by about 10 % from one to the next on 2 cores: more of them
    extraction: tuple[tuple[str, int, int], ...]  # (torchvision arch, image side, batch)
    gpu_extraction: tuple[tuple[str, int, int], ...]  # the same on a GPU, at batches that fill it
    bytes_samples: int
    memory_samples: int
    repeats: int
    gpu_batch: int  # the GPU goal (>= 2,500 images/s) is for batch 256
    warm_up: bool  # a first, untimed turn: for figures; `quick` only checks that each runs
    gpu_end_to_end: str  # the GPU section's stage one from JPEGs and student steps: bench_gpu.SCALES' key


ILSVRC2012_TRAIN = 1_281_167  # samples: its store's block size is the reader's
FULL = Scale(131072, default_block_size(ILSVRC2012_TRAIN), 2048, 5, "train", 7,
             (("resnet18", 64, 32), ("resnet18", 224, 16), ("densenet121", 112, 16), ("vgg11", 112, 16)),
             (("resnet18", 224, 256), ("densenet121", 224, 128), ("vgg11", 224, 128)), 8192, 512, 3, 256, True, "full")
QUICK = Scale(8192, 1024, 256, 1, "test", 1, (("resnet18", 32, 4), ("vgg11", 32, 4)), (("resnet18", 32, 8),), 2048, 32, 1, 8, False, "quick")


def median_seconds(setups: dict[str, Callable[[], object]], repeats: int,
                   before: Callable[[], None] = lambda: None, warm_up: bool = True) -> dict[str, float]:
    """Median wall time of each setup; the setups take turns (in reverse order every other turn, so that
    none always follows the same one), and the first turn is an untimed warm-up unless `warm_up` is False."""
    times = {name: [] for name in setups}
    first = 0 if warm_up else 1
    for turn in range(first, repeats + 1):
        for name, run in list(setups.items())[::-1 if turn % 2 else 1]:
            before()
            began = time.perf_counter()
            run()
            if turn:
                times[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in times.items()}


# -- stores -------------------------------------------------------------------------------------


def smooth_maps(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    """uint8 maps that look like Grad-CAMs: a bilinear blow-up of 3x3 noise, negative parts cut off."""
    coarse = torch.from_numpy(rng.normal(size=(n, 1, 3, 3)).astype(np.float32))
    return quantize_cam(torch.relu(F.interpolate(coarse, size=(side, side), mode="bilinear"))[:, 0])[0]


def synthetic_store(path: Path, samples: int, classes: int, map_side: int, block_size: int,
                    logits: dict | None = None, teachers=TEACHERS, chunks_per_block: int = 4) -> TeacherStore:
    """A complete store of random values: logits ~ N(0, 3), smooth maps, Y uniform, O below it."""
    rng = np.random.default_rng(0)
    identity = {"name": "synthetic", "split": "train", "num_samples": samples, "num_classes": classes,
                "image_shape": [224, 224, 3], "ids_sha256": "0" * 64}
    labels = rng.integers(0, classes, samples)
    store = TeacherStore.create(path, identity, labels, None, target="label", block_size=block_size, logits=logits,
                                chunks_per_block=chunks_per_block)
    for t, name in enumerate(teachers):
        store.add_teacher(name, {"arch": "synthetic", "weights_sha256": str(t), "target_layer": "x",
                                 "transform": {}, "map_shape": [map_side, map_side],
                                 "heldout": {"split": "val", "samples": 100, "top1": 0.5 + t / 100,
                                             "mean_drop": 0.5}})
    for block in range(store.num_blocks):
        start, stop = store.block_rows(block)
        n = stop - start
        store.write_samples(block, {"valid": np.ones(n, bool), "view_boxes": np.tile([0, 0, 224, 224], (n, 1, 1)),
                                    "view_flips": np.zeros((n, 1), bool)})
        for name in teachers:
            logit_values = torch.from_numpy(rng.normal(0, 3, (n, classes)).astype(np.float32))
            y = rng.uniform(0.01, 1, n).astype(np.float32)
            arrays = {
                **(topk_logit_fields(logit_values, logits["k"]) if logits else {"logits": logit_values.half().numpy()}),
                "cam": smooth_maps(rng, n, map_side), "cam_max": rng.uniform(0, 2, n).astype(np.float32),
                "cam_class": labels[start:stop], "y_prob": y, "o_prob": y * rng.uniform(0, 1, n).astype(np.float32),
                "attention": smooth_maps(rng, n, map_side), "attention_max": rng.uniform(0, 2, n).astype(np.float32)}
            store.write_block(name, block, {key: value[:, None] for key, value in arrays.items()})  # one view
    return store


def evict(root: Path) -> None:
    """Drop `root`'s files from the page cache, so that the next read comes from the disk, as it would
    from a store larger than memory."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def bytes_under(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


# -- stage two's reader -------------------------------------------------------------------------


def stream_pass(store: TeacherStore, fields: list[str]) -> None:
    """One epoch of stage two's reader over every block (a new stream: nothing is held from before)."""
    for _ in BlockStream(str(store.location), fields, list(range(store.num_blocks)), 256, seed=1):
        pass


def zarr_pass(store: TeacherStore, fields: list[str]) -> None:
    """The peer: zarr's own reads of the same arrays, a block of each at a time."""
    group = zarr.open_group(store.location.path, mode="r")  # bench stores are folders
    arrays = [group[f] for f in ["valid", *fields]]
    for start, stop in map(store.block_rows, range(store.num_blocks)):
        for array in arrays:
            array[start:stop]


def reader_figures(folder: Path, scale: Scale) -> list[Figure]:
    """Samples/s of the explain-kd fields of 3 teachers from an ImageNet-shaped store (top-10 logits,
    7x7 maps) whose files are evicted from the page cache before every pass."""
    store = synthetic_store(folder / "reader.zarr", scale.reader_samples, 1000, 7, scale.reader_block,
                            logits={"mode": "topk", "k": 10})
    fields = ["labels", *method_of("explain-kd").arrays(list(TEACHERS), store.logit_fields)]
    files = folder / "per-sample"
    files.mkdir()
    rows = store.read_rows(0, scale.per_sample_files, fields)
    for i in range(scale.per_sample_files):  # torchdistill's cache: one torch.save file per sample
        torch.save({f: torch.from_numpy(rows[f][i:i + 1]) for f in fields}, files / f"{i}.pt")

    def ours():
        stream_pass(store, fields)

    def plain_zarr():
        zarr_pass(store, fields)

    def per_sample():
        for i in range(scale.per_sample_files):
            torch.load(files / f"{i}.pt", weights_only=True)

    def cold():
        evict(store.location.path)
        evict(files)

    seconds = median_seconds({"ours": ours, "zarr": plain_zarr, "files": per_sample}, scale.repeats, before=cold,
                             warm_up=scale.warm_up)
    warm = median_seconds({"ours": ours}, scale.repeats, warm_up=scale.warm_up)["ours"]
    rate = {name: n / seconds[name] for name, n in
            (("ours", store.num_samples), ("zarr", store.num_samples), ("files", scale.per_sample_files))}
    shape = (f"{len(fields)} arrays, {store.num_samples:,} samples in blocks of {store.block_size}, "
             "page cache dropped before each pass")
    return [
        Figure(f"stage two's reader, samples/s ({shape})", rate["ours"],
               f"plain zarr reads {rate['zarr']:,.0f}; per-sample torch.save files {rate['files']:,.0f}",
               ">= 250,000", rate["ours"] >= 250_000),
        Figure("reader / plain zarr reads", rate["ours"] / rate["zarr"]),
        Figure("stage two's reader, samples/s, store in the page cache", store.num_samples / warm),
    ]


# -- a student run from the store --------------------------------------------------------------


def digits_store(folder: Path, split: str) -> Path:
    """A digits store as the default pipeline makes it (its teachers' architectures, random weights),
    written by stage one itself."""
    checkpoints = [str(make_teacher(folder / f"{arch}.pt", arch, seed)) for seed, arch in enumerate(DIGITS_TEACHERS)]
    store = folder / f"digits-{split}.zarr"
    if store.exists():  # made by an earlier section of this run
        return store
    extract_teachers(ExtractConfig(dataset="digits", split=split, teachers=checkpoints, store=str(store)))
    return store


def student_figures(store: Path, folder: Path, scale: Scale) -> list[Figure]:
    """Wall time of a whole `train-student` run (same student, store, epochs) per method, over ce's."""
    runs = {"ce": {"method": "ce"}, "kd": {"method": "kd"}, "explain-kd": {"method": "explain-kd"},
            "explain-kd, design recipe": {"method": "explain-kd", "recipe": "design"}}
    setups = {name: (lambda options=options: train_student(TrainStudentConfig(
        dataset="digits", split=scale.digits_split, store=str(store), epochs=scale.student_epochs,
        out_dir=str(folder / "students"),
        **options))) for name, options in runs.items()}
    seconds = median_seconds(setups, scale.student_repeats, warm_up=scale.warm_up)
    device = resolve_device("auto").type  # where train-student runs by default
    data = "digits" if scale.digits_split == "train" else f"digits {scale.digits_split} split"
    return [Figure(f"student run {name} / ce ({scale.student_epochs} epochs, {data}, resnet8_slim, {device}, "
                   f"median of {scale.student_repeats})",
                   seconds[name] / seconds["ce"], *(("cached-teacher prototype 0.97; online 3 teachers ~8", "<= 1.05",
                                                    seconds[name] / seconds["ce"] <= 1.05) if name == "explain-kd"
                                                   else ()))
            for name in runs if name != "ce"]


def online_figure(path: Path, scale: Scale) -> Figure:
    """Per training step: the 3 teachers explained online (stage one's work) plus the student's step,
    over the student's step from cached rows."""
    info = get_dataset("digits", "train").info
    store = TeacherStore.open(path)
    fields = ["images", "labels", *method_of("explain-kd").arrays(store.teachers, store.logit_fields)]
    batch = next(iter(BlockStream(str(store.location), fields, [0], 64)))
    teachers = []
    for arch in DIGITS_TEACHERS:
        model = create_model(arch, info.image_shape[2], info.num_classes).eval()
        teachers.append((model, CamLayer.of(model, probe_input(info.image_shape))))
    student = create_model("resnet8_slim", info.image_shape[2], info.num_classes)
    layer = CamLayer.of(student.eval(), probe_input(info.image_shape))
    student.train()
    loss_fn = DistillationLoss(method_of("explain-kd"), store.teachers, layer, info.mean, info.std, info.num_classes,
                               LossSettings(beta=0.5, student_map="attention"), kd_teacher=store.teachers[-1],
                               policy=PerSample())
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    x = (batch["images"].permute(0, 3, 1, 2).float() / 255 - torch.tensor(info.mean).view(1, -1, 1, 1)) / \
        torch.tensor(info.std).view(1, -1, 1, 1)

    def cached():
        optimizer.zero_grad()
        loss_of(loss_fn(student, batch)).backward()
        optimizer.step()

    def online():
        for model, cam_layer in teachers:
            explain(model, cam_layer, x, batch["labels"], "label", info.mean, info.std)
        cached()

    steps = range(scale.student_epochs * 2)
    seconds = median_seconds({"cached": lambda: [cached() for _ in steps], "online": lambda: [online() for _ in steps]},
                             scale.repeats, warm_up=scale.warm_up)
    return Figure("online distillation step / cached (3 digits teachers, batch 64)",
                  seconds["online"] / seconds["cached"], "a prototype's online 3-teacher step: ~8")


# -- stage one ----------------------------------------------------------------------------------


def torchvision_teacher(arch: str) -> Teacher:
    import torchvision  # noqa: PLC0415

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=1000).eval()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return Teacher(arch, model, CamLayer.of(model, probe_input((64, 64, 3))), Transform(mean, std), {})


def extraction_figures(scale: Scale, device: torch.device) -> list[Figure]:
    """Stage one's work on a batch (logits, Grad-CAM, the scoring forward, attention; as extraction runs
    it) over a bare inference forward, and the grad-cam package's GradCAM + confidence metric over ours."""
    figures = []
    for arch, side, batch in scale.extraction if device.type == "cpu" else scale.gpu_extraction:
        teacher = torchvision_teacher(arch)
        teacher.model = prepare_model(teacher.model, device)
        images = torch.randint(0, 256, (batch, side, side, 3), dtype=torch.uint8)  # as the loader yields them
        labels = torch.randint(0, 1000, (batch,))
        setups = {"bare": lambda: bare_forward(teacher, images, device),
                  "ours": lambda: explain_batch(teacher, images, labels, "label", device)}
        if device.type == "cpu" and has_grad_cam():  # the peer runs on the CPU only
            x = normalize(images, teacher.transform.mean, teacher.transform.std)
            setups["grad-cam"] = lambda: grad_cam_package(teacher, x, labels)
        seconds = median_seconds(setups, scale.repeats, warm_up=scale.warm_up)
        autograd = not teacher.layer.linear_head
        limit = 2.5 if autograd else 2.0
        ratio = seconds["ours"] / seconds["bare"]
        figures.append(Figure(f"stage one batch work / bare forward ({arch}, {side} px, batch {batch}, "
                              f"{'autograd' if autograd else 'GAP head'}, {device.type})", ratio,
                              "grad-cam package + its confidence metric: 4.7 to 5.1", f"<= {limit}", ratio <= limit))
        if device.type == "cpu":
            figures.append(Figure(f"grad-cam package / ours, same maps and scores ({arch}, {side} px)",
                                  seconds["grad-cam"] / seconds["ours"] if "grad-cam" in seconds
                                  else "grad-cam not installed: pip install -e '.[bench]'"))
    return figures


def bare_forward(teacher: Teacher, images: torch.Tensor, device: torch.device) -> None:
    """The anchor: a plain inference loop's work on a batch (its input prepared as stage one prepares it)."""
    x = to_device(normalize(images.to(device, non_blocking=True), teacher.transform.mean, teacher.transform.std),
                  device)
    with torch.inference_mode(), autocast(device):
        teacher.model(x)
    sync(device)


def has_grad_cam() -> bool:
    return importlib.util.find_spec("pytorch_grad_cam") is not None


def grad_cam_package(teacher: Teacher, x: torch.Tensor, labels: torch.Tensor) -> None:
    """The peer: the grad-cam package's GradCAM maps and its confidence change on the map-multiplied image."""
    from pytorch_grad_cam import GradCAM  # noqa: PLC0415
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange  # noqa: PLC0415
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget  # noqa: PLC0415

    layer = module_path(teacher.model, teacher.layer.target_layer)
    with GradCAM(model=teacher.model, target_layers=[layer]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in labels])
    CamMultImageConfidenceChange()(x, maps, [ClassifierOutputSoftmaxTarget(int(c)) for c in labels], teacher.model)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_figures(scale: Scale, device: torch.device) -> list[Figure]:
    """Extraction images/s of torchvision resnet50 at 224 px (bf16, channels_last, scoring included),
    beside its bare inference forward's."""
    teacher = torchvision_teacher("resnet50")
    teacher.model = prepare_model(teacher.model, device)
    batch = scale.gpu_batch
    images = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8).pin_memory()
    labels = torch.randint(0, 1000, (batch,))

    seconds = median_seconds({"ours": lambda: (explain_batch(teacher, images, labels, "label", device), sync(device)),
                              "bare": lambda: bare_forward(teacher, images, device)}, scale.repeats,
                             warm_up=scale.warm_up)
    rate, bare_rate = batch / seconds["ours"], batch / seconds["bare"]
    judged = batch == FULL.gpu_batch
    return [Figure(f"extraction images/s, resnet50 224 px bf16 channels_last, batch {batch} "
                   f"({torch.cuda.get_device_name(device)})", rate,
                   f"bare inference forward {bare_rate:,.0f} ({seconds['ours'] / seconds['bare']:.2f}x the time)",
                   ">= 2,500 (one H100)" if judged else "-", rate >= 2500 if judged else None)]


# -- the store's size and stage one's memory -------------------------------------------------


def bytes_figures(folder: Path, scale: Scale) -> list[Figure]:
    """Bytes on disk per sample per teacher (all of a teacher's arrays; values as `synthetic_store`)."""
    figures = []
    for shape, classes, side in (("CIFAR-100", 100, 8), ("ImageNet", 1000, 7)):
        for logits in (None, {"mode": "topk", "k": 10}):
            name = f"{shape}-{'full' if logits is None else 'top10'}"
            store = synthetic_store(folder / f"{name}.zarr", scale.bytes_samples, classes, side,
                                    min(4096, scale.bytes_samples), logits, teachers=("t0",))
            value = store.location.size("teachers/t0") / scale.bytes_samples
            goal = shape == "ImageNet" and logits is not None
            figures.append(Figure(f"store bytes/sample/teacher, {shape} shape, {side}x{side} maps, "
                                  f"{'full' if logits is None else 'top-10'} logits (synthetic values)", value, "-",
                                  "<= 100" if goal else "-", value <= 100 if goal else None))
    return figures


def memory_figure(folder: Path, scale: Scale) -> Figure:
    """Peak resident memory of `pipeline extract-teachers` (CIFAR-10 files, one teacher) at N and 4N
    samples, each in a fresh process."""
    peaks = {}
    for n in (scale.memory_samples, 4 * scale.memory_samples):
        root = make_cifar(folder / f"cifar-{n}", per_batch=n // 5)
        teacher = make_teacher(folder / "cifar-teacher.pt", "resnet20", dataset="cifar10", data_root=root)
        command = [sys.executable, "-c", "import resource, sys; from pipeline.cli import main; "
                   "sys.argv = ['pipeline'] + sys.argv[1:];\ntry: main()\nexcept SystemExit: pass\n"
                   "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
                   "extract-teachers", "--dataset", "cifar10", "--data-root", str(root), "--teachers", str(teacher),
                   "--store", str(folder / f"cifar-{n}.zarr"), "--block-size", "64", "--batch-size", "32"]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        peaks[n] = int(out.rsplit("peak", 1)[1]) / 1024
    small, large = peaks.values()
    return Figure(f"extraction peak memory, MiB, at {scale.memory_samples} and {4 * scale.memory_samples} samples "
                  "(CIFAR-10 files, resnet20)", f"{small:,.0f} and {large:,.0f} ({large / small:.2f}x)", "-",
                  "flat (<= 1.1x)", large / small <= 1.1)


# -- the command ---------------------------------------------------------------------------------


def sections(scale: Scale, folder: Path) -> dict[str, Callable[[], list[Figure]]]:
    """The figures by section, so that one can be rerun alone (`--only`); `gpu` only on a CUDA machine.
    The student runs use the default device (the GPU on a CUDA machine)."""
    found = {"reader": lambda: reader_figures(folder, scale),
             "student": lambda: student_figures(digits_store(folder, scale.digits_split), folder, scale),
             "online": lambda: [online_figure(digits_store(folder, scale.digits_split), scale)],
             "stage-one": lambda: extraction_figures(scale, torch.device("cpu")),
             "bytes": lambda: bytes_figures(folder, scale), "memory": lambda: [memory_figure(folder, scale)]}
    if torch.cuda.is_available():
        from pipeline import bench_gpu  # noqa: PLC0415 (it builds on this module)

        device, gpu_scale = resolve_device("cuda"), bench_gpu.SCALES[scale.gpu_end_to_end]
        found["gpu"] = lambda: (extraction_figures(scale, device) + gpu_figures(scale, device)
                                + bench_gpu.stage_one_figures(folder / "gpu", gpu_scale, device)
                                + bench_gpu.step_figures(gpu_scale, device))
    return found


def run_all(scale: Scale, folder: Path, only: tuple[str, ...] = ()) -> list[Figure]:
    available = sections(scale, folder)
    if "gpu" in only and "gpu" not in available:
        raise PipelineError("--only gpu needs a CUDA GPU, and torch sees none")
    figures = []
    for name in only or [name for name in BENCH_SECTIONS if name in available]:
        began = time.perf_counter()
        figures += available[name]()
        print(f"bench: {name}: {figures[-1].figure} ... ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
    return figures


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def markdown(figures: list[Figure]) -> str:
    lines = ["| figure | value | peer | goal | met |", "|---|---|---|---|---|"]
    return "\n".join(lines + ["| " + " | ".join(f.cells()) + " |" for f in figures])


def run_bench(quick: bool, json_path: str | None, repeats: int | None, only: tuple[str, ...] = ()) -> str:
    """Every figure, as one markdown table under a line that names the machine (see `pipeline bench`)."""
    scale = QUICK if quick else FULL
    if repeats is not None:
        scale = replace(scale, repeats=repeats, student_repeats=repeats)
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):  # the stages' own lines
        figures = run_all(scale, Path(folder), only)
    if json_path:
        Path(json_path).write_text(json.dumps({"machine": machine(), "quick": quick,
                                               "figures": [asdict(f) for f in figures]}, indent=1) + "\n")
    return f"{machine()}\n\n{markdown(figures)}"
