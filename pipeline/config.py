"""One dataclass per stage (stage two's is pipeline.student_config); the CLI builds its options from their
fields and their help.

A stage's config = the dataclass defaults, then params.yaml's `data` section and the
stage's own section (when --params is given), then options given on the command line.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from pipeline.errors import PipelineError

TARGETS = ("label", "predicted")
DEFAULT_TEACHERS = ("resnet20", "wrn16_2", "vgg8_bn")
MAP_NORMS = ("l2", "mean")
DECODERS = ("cpu", "gpu")  # where extract-teachers --decode decodes image files
BENCH_SECTIONS = ("reader", "student", "online", "stage-one", "bytes", "memory", "gpu")  # `pipeline bench --only`
FLIP_HELP = ("augmentation: random horizontal flips, for data sets whose classes are mirror-symmetric "
             "(CIFAR, ImageNet; refused for digits)")


def setting(default, help: str):
    """A config field with its --help text; list defaults are copied per instance."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def whole_numbers(option: str, value, example: str) -> list[int]:
    """A list of whole numbers as params.yaml (a list, one number, "0,1") or the command line gives it."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        return [int(str(item).strip()) for item in items if str(item).strip()]
    except ValueError:
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        raise PipelineError(f"{option} takes whole numbers, e.g. {example}; got {shown}") from None


def check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PipelineError(f"unknown {kind} {value!r}; choose one of: {', '.join(choices)}")


@dataclass
class DataConfig:
    dataset: str = setting("digits", "data set registry name")
    data_root: str | None = setting(None, "folder holding the data set (default: $PIPELINE_DATA_ROOT, else "
                                     "data_cache/datasets; digits needs none)")
    split_seed: int = setting(0, "seed of the train/test split for data sets without an official one")
    download: bool = setting(False, "cifar10/cifar100: fetch the data set with torchvision's downloader when "
                             "it is missing (needs internet)")


@dataclass
class ScheduleSettings:
    """The learning-rate schedule's settings, for the stages that train (pipeline.train.LrSchedule)."""

    lr_schedule: str = setting("cosine", "learning-rate schedule: cosine (decay to 0 over the run, per step) | step "
                               "(times --lr-decay at each of --lr-milestones)")
    lr_milestones: list[int] = setting([], "step schedule: the epochs after which the rate is multiplied by "
                                       "--lr-decay (CA-MKD on CIFAR-100: 150,180,210 of 240)")
    lr_decay: float = setting(0.1, "step schedule: the factor at each milestone")

    def lr_schedule_of(self):
        """The LrSchedule these settings say (checked: a milestone list only with the step schedule)."""
        from pipeline.train import LrSchedule

        check_choice("learning-rate schedule", self.lr_schedule, ("cosine", "step"))
        milestones = tuple(sorted(whole_numbers("--lr-milestones", self.lr_milestones, "150,180,210")))
        self.lr_milestones = list(milestones)  # one spelling, from the command line or params.yaml (resume identity)
        epochs = getattr(self, "epochs")
        if (self.lr_schedule == "step") != bool(milestones):
            raise PipelineError("--lr-milestones go with --lr-schedule step, and step needs them; got --lr-schedule "
                                f"{self.lr_schedule} and milestones {list(milestones) or 'none'}")
        if any(not 1 <= m < epochs for m in milestones) or len(set(milestones)) < len(milestones):
            raise PipelineError(f"--lr-milestones must be distinct epochs from 1 to {epochs - 1} (of --epochs {epochs}: "
                                f"a later one never applies); got {list(milestones)}")
        if not 0 < self.lr_decay < 1:
            raise PipelineError(f"--lr-decay must be between 0 and 1 (the factor at each milestone); got {self.lr_decay}")
        return LrSchedule(self.lr_schedule, milestones, self.lr_decay)


@dataclass
class TrainTeachersConfig(ScheduleSettings, DataConfig):
    section: ClassVar[str] = "train_teachers"  # its section of params.yaml
    teachers: list[str] = setting(DEFAULT_TEACHERS, "teacher architectures to train (model registry names; "
                                  "<arch>@<seed>: trained with that seed, saved as <arch>-s<seed>)")
    out_dir: str = setting("data_cache/teachers", "folder for <name>.pt checkpoints and metrics.json")
    epochs: int = setting(8, "training epochs per teacher")
    batch_size: int = setting(64, "training batch size")
    lr: float = setting(0.05, "peak learning rate (SGD, Nesterov momentum 0.9, --lr-schedule)")
    weight_decay: float = setting(5e-4, "L2 weight decay")
    seed: int = setting(0, "seed for initialisation and batch order (a teacher named <arch>@<seed> takes its own)")
    target: str = setting("label", "class whose Grad-CAM the test metrics score: label | predicted")
    shift: int = setting(0, "augmentation: random translation by up to this many pixels (0: none)")
    flip: bool = setting(False, FLIP_HELP)
    domain: str = setting("", "train on this group of the data set only (a domain of shape-domains; the head "
                          "keeps every class): a specialist, named <arch>-<domain>")
    classes: list[int] = setting([], "train on the samples of these classes only (the head keeps every class): "
                                 "a specialist, named <arch>-c<class>_<class>...")

    def __post_init__(self):
        check_choice("target", self.target, TARGETS)
        self.lr_schedule_of()
        self.classes = sorted(set(whole_numbers("--classes", self.classes, "0,1,2")))  # one spelling


@dataclass
class ExtractConfig(DataConfig):
    section: ClassVar[str] = "extract_teachers"  # its section of params.yaml
    split: str = setting("train", "data set split to cache")
    teachers: list[str] = setting(
        [f"data_cache/teachers/{name}.pt" for name in DEFAULT_TEACHERS],
        "teachers, each checkpoint:<path> (or a path), torchvision:<arch>:<weights> or timm:<name>",
    )
    target_layer: list[str] = setting([], "Grad-CAM layer of a teacher, as <teacher>=<module.path> "
                                      "(default: the last feature map before pooling)")
    logits: str = setting("full", "full (all C logits) | topk:K (the K largest and their classes)")
    device: str = setting("auto", "auto (cuda when available) | cpu | cuda | cuda:N")
    skip_corrupt: bool = setting(False, "skip unreadable images and record them (valid = False) "
                                 "instead of stopping")
    store: str = setting("data_cache/stores/digits-train.zarr", "Zarr store to write (created, or resumed)")
    on_change: str = setting("error", "an existing store made from other data or settings, or holding a teacher "
                             "of the same name with other weights, or made by another extraction version: error (stop and say what differs) | "
                             "replace (recompute what differs and drop teachers not listed; DVC stages use it)")
    target: str = setting("label", "class whose Grad-CAM is cached: label (ground truth) | predicted")
    views: int = setting(1, "views cached per sample: view 0 is the eval view, the others random crops "
                         "(RandomResizedCrop geometry for image files, padded crops for in-memory sets) and flips "
                         "where the classes are mirror-symmetric; students cycle through them")
    view_seed: int = setting(0, "seed of the random views (view v of a sample depends on it, the sample's id and v)")
    view_shift: int = setting(4, "in-memory data sets: random views are crops of the image padded by this many "
                              "pixels (ignored for image files)")
    jpeg_draft: bool = setting(True, "image files: decode a JPEG view at 1/2, 1/4 or 1/8 scale where its box is "
                               "at least that many times the input size (faster; off: every view from the full "
                               "decode); recorded in the store, students decode alike")
    decode: str = setting("cpu", "image files: where views are decoded and cut: cpu (Pillow, in the loader "
                          "workers) | gpu (JPEGs by nvJPEG on the CUDA device, whole: --jpeg-draft does not apply; "
                          "every view of an image from one decode); recorded in the store, students decode alike")
    block_size: int | None = setting(None, "samples per shard: the unit of writing, resuming and reading (default: "
                                     "the largest of 256, 1024, 4096, 16384 that makes at least 32 blocks)")
    batch_size: int = setting(128, "teacher batch size")
    num_workers: int = setting(0, "DataLoader worker processes that load images")
    blocks: str | None = setting(
        None, "extract only part i of n of the blocks, as i/n (1-based); n processes with 1/n ... n/n "
        "together write the same store as one"
    )
    scheduler: str | None = setting(
        None, "run one dask task per block: local:N (a cluster of N worker processes on this machine; on a GPU "
        "machine worker i uses GPU i mod the GPUs) | tcp://host:port (a running dask scheduler whose workers "
        "have this package, the data and the store's path); default: this process alone"
    )

    def __post_init__(self):
        check_choice("target", self.target, TARGETS)
        check_choice("on-change mode", self.on_change, ("error", "replace"))
        check_choice("decoder", self.decode, DECODERS)
        self.block_part()
        self.check_scheduler()
        self.logits_mode()

    def logits_mode(self) -> dict:
        """{"mode": "full"} or {"mode": "topk", "k": K}."""
        if self.logits == "full":
            return {"mode": "full"}
        kind, _, k = self.logits.partition(":")
        if kind != "topk" or not k.isdigit() or int(k) < 1:
            raise PipelineError(f"--logits takes full or topk:K with K >= 1, e.g. topk:10; got {self.logits!r}")
        return {"mode": "topk", "k": int(k)}

    def check_scheduler(self) -> None:
        local = (self.scheduler or "").removeprefix("local:")
        if self.scheduler is None or (self.scheduler.startswith("local:") and local.isdigit() and int(local) >= 1) \
                or self.scheduler.startswith(("tcp://", "tls://")):
            return
        raise PipelineError(f"unknown --scheduler {self.scheduler!r}; choose local:N (N >= 1 worker processes on this "
                            "machine) or tcp://host:port (a running dask scheduler)")

    def block_part(self) -> tuple[int, int]:
        """(i, n) with 0 <= i < n: this process takes the blocks b with b % n == i."""
        if self.blocks is None:
            return 0, 1
        try:
            i, n = (int(v) for v in str(self.blocks).split("/"))
        except ValueError:
            i, n = 0, 0
        if not 1 <= i <= n:
            raise PipelineError(f"--blocks must be i/n with 1 <= i <= n, e.g. 1/2; got {self.blocks!r}")
        return i - 1, n


@dataclass
class EvaluateConfig(DataConfig):
    section: ClassVar[str] = "evaluate"  # its section of params.yaml
    students_dir: str = setting("data_cache/students", "every <run>/checkpoint.pt below it is evaluated")
    teacher_metrics: str = setting("data_cache/teachers/metrics.json", "teacher metrics from train-teachers")
    out: str = setting("data_cache/metrics.json", "metrics JSON to write (read by `dvc metrics show`)")
    target: str = setting("label", "class whose Grad-CAM is scored: label | predicted")
    batch_size: int = setting(256, "evaluation batch size")

    def __post_init__(self):
        check_choice("target", self.target, TARGETS)


@dataclass
class ReportConfig(DataConfig):
    section: ClassVar[str] = "report"  # its section of params.yaml
    students_dir: str = setting("data_cache/students", "every <run>/checkpoint.pt below it is a run; runs named "
                                "<variant>-s<seed> are grouped by variant")
    out_dir: str = setting("reports", "writes results.csv, results.md, runs.csv and accuracy.png here (with --store "
                           "also drops.png and explanations.png)")
    baseline: str = setting("kd", "variant the paired (same seed) differences are taken against")
    comparisons: list[str] = setting([], "the primary comparisons, each VARIANT:AGAINST (paired by seed): each "
                                     "difference with its 95 % interval, Holm's correction over them all (default: "
                                     "every variant against --baseline)")
    store: str | None = setting(None, "teacher store of the test split (`val` where there is none): draws each "
                                "teacher's confidence drops (drops.png) and the explanation grid (explanations.png)")
    explain_runs: list[str] = setting([], "student runs (<variant>-s<seed>) whose own Grad-CAM maps the "
                                      "explanation grid shows beside the teachers' maps")
    explain_images: int = setting(6, "test images (rows) in the explanation grid")
    metrics: str | None = setting(None, "also write the summary to this JSON file, a DVC metrics file (`dvc metrics "
                                  "show`, `dvc exp show`): per variant its seeds, test mean and std, and the paired "
                                  "difference to the baseline with its 95 % interval")


def load_config(cls, params_file: str | Path | None = None, **overrides):
    """Build `cls` from defaults, then params.yaml (`data` + the stage section, then the settings of the
    variant named, for students), then overrides (None = unset)."""
    values: dict = {}
    params = {}
    if params_file is not None:
        path = Path(params_file)
        if not path.is_file():
            raise PipelineError(f"params file {path} does not exist; pass an existing --params file")
        params = yaml.safe_load(path.read_text()) or {}
        values.update(params.get("data") or {})
        values.update(params.get(cls.section) or {})
    variant = overrides.get("variant") or values.get("variant")
    if variant is not None:
        variants = params.get("variants") or {}
        if not isinstance(variants, dict):
            raise PipelineError(f"{params_file}: `variants` must map each name to its train_student settings "
                                "(ekd-b10: {method: explain-kd, recipe: design}), not a list")
        if variant not in variants:
            raise PipelineError(f"--variant {variant}: {params_file} has no such variant; choose one of: "
                                f"{', '.join(variants)}" if variants else f"--variant {variant} needs --params FILE "
                                "with a `variants` section (name -> train_student settings)")
        values.update(variants[variant] or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PipelineError(
            f"unknown {cls.section} setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    return cls(**values)
