"""One dataclass per stage; the CLI builds its options from these fields and their help.

A stage's config = the dataclass defaults, then params.yaml's `data` section and the
stage's own section (when --params is given), then options given on the command line.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.errors import PipelineError

METHODS = ("ce", "kd", "kd-avg", "at", "explain-kd")
POLICIES = ("per-sample", "global", "weighted", "correct", "random")
TARGETS = ("label", "predicted")
DEFAULT_TEACHERS = ("resnet20", "wrn16_2", "vgg8_bn")
MAP_NORMS = ("l2", "mean")
BENCH_SECTIONS = ("reader", "student", "online", "stage-one", "bytes", "memory", "gpu")  # `pipeline bench --only`
# explain-kd's map and logit settings: `validated` was chosen on validation in the first round of
# the cluttered-digits study, and in the reruns it is never worse than kd and far above ce (README,
# Verdict); `design` is DESIGN.md's formulation as written, which collapses on cluttered-digits at
# beta 10. Any of the three options still overrides a recipe.
RECIPES = {
    "validated": {"student_map": "attention", "kd_source": "best", "beta": 0.5},
    "design": {"student_map": "gradcam", "kd_source": "selected", "beta": 10.0},
}
AT_BETA = 1.0  # attention transfer's validated beta (cluttered-digits study, at-b1)
FLIP_HELP = ("augmentation: random horizontal flips, for data sets whose classes are mirror-symmetric "
             "(CIFAR, ImageNet; refused for digits)")


def setting(default, help: str):
    """A config field with its --help text; list defaults are copied per instance."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


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
class TrainTeachersConfig(DataConfig):
    teachers: list[str] = setting(DEFAULT_TEACHERS, "teacher architectures to train (model registry names)")
    out_dir: str = setting("data_cache/teachers", "folder for <arch>.pt checkpoints and metrics.json")
    epochs: int = setting(8, "training epochs per teacher")
    batch_size: int = setting(64, "training batch size")
    lr: float = setting(0.05, "peak learning rate (SGD, Nesterov momentum 0.9, cosine decay)")
    weight_decay: float = setting(5e-4, "L2 weight decay")
    seed: int = setting(0, "seed for initialisation and batch order")
    target: str = setting("label", "class whose Grad-CAM the test metrics score: label | predicted")
    shift: int = setting(0, "augmentation: random translation by up to this many pixels (0: none)")
    flip: bool = setting(False, FLIP_HELP)

    def __post_init__(self):
        check_choice("target", self.target, TARGETS)


@dataclass
class ExtractConfig(DataConfig):
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
                             "of the same name with other weights or code: error (stop and say what differs) | "
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
class TrainStudentConfig(DataConfig):
    split: str = setting("train", "data set split the store was extracted from")
    store: str = setting("data_cache/stores/digits-train.zarr", "teacher store to learn from")
    method: str = setting("explain-kd", "ce | kd | kd-avg | at | explain-kd")
    teacher: str | None = setting(None, "kd, at and explain-kd --kd-source best: the one teacher's name (default: "
                                  "the best validation accuracy recorded in the store; never test accuracy)")
    policy: str = setting("per-sample", "explain-kd teacher choice: per-sample (lowest confidence drop) | "
                          "global (the one teacher with the lowest mean drop) | weighted (softmax of -drop) | "
                          "correct (per-sample among teachers that classify the sample correctly) | random (per sample a "
                          "seeded, uniformly random teacher: the control for the explanation score)")
    policy_temperature: float = setting(0.1, "weighted policy: weights proportional to Y * exp(-drop / t)")
    detach_head: bool = setting(False, "explain-kd: the student map uses detached classifier weights, so the "
                                "map term shapes features only")
    recipe: str = setting("validated", "explain-kd defaults of --student-map, --kd-source and --beta: validated "
                          "(attention, best, 0.5: the studies' best on validation) | design (gradcam, selected, 10: "
                          "DESIGN.md as written)")
    student_map: str | None = setting(None, "explain-kd: the student map the teacher's Grad-CAM is compared with: "
                                      "gradcam (its own differentiable Grad-CAM) | attention (mean of squared "
                                      "activations) (default: per --recipe)")
    kd_source: str | None = setting(None, "explain-kd: logits from the selected teacher(s) (selected) or from the "
                                    "best held-out teacher, as kd (best); the maps follow --policy either way "
                                    "(default: per --recipe)")
    beta_warmup: int = setting(0, "epochs over which the map weight beta ramps up linearly (0: none)")
    shift: int = setting(0, "augmentation: random translation by up to this many pixels (0: none)")
    flip: bool = setting(False, FLIP_HELP)
    map_follows: bool = setting(True, "with --shift / --flip: cached teacher maps move with their images")
    map_norm: str = setting("l2", "map term: per-sample normalisation of both maps: l2 (unit L2 norm, summed "
                            "squared distance) | mean (mean 1, mean squared distance over cells)")
    map_size: int = setting(0, "map term: both maps are resized (bilinear) to this side length before they are "
                            "compared (0: the student's map size)")
    arch: str = setting("resnet8_slim", "student architecture (model registry name, or torchvision:<arch>)")
    out_dir: str = setting("data_cache/students", "the run writes <out-dir>/<run-name>/")
    run_name: str | None = setting(None, "name of the run folder (default: the method)")
    temperature: float = setting(4.0, "KD temperature T (the KD term is scaled by T^2)")
    alpha: float = setting(1.0, "weight of the KD term (cross-entropy has weight 1)")
    beta: float | None = setting(None, "weight of the map term: explain-kd (default: per --recipe) or at (default: 1)")
    epochs: int = setting(15, "training epochs")
    batch_size: int = setting(64, "training batch size (under torchrun per process: the global batch is that "
                              "times the processes)")
    lr: float = setting(0.05, "peak learning rate (SGD, Nesterov momentum 0.9, cosine decay)")
    weight_decay: float = setting(5e-4, "L2 weight decay")
    seed: int = setting(0, "seed for initialisation and batch order")
    num_workers: int = setting(0, "DataLoader worker processes streaming store blocks")
    mix_blocks: int = setting(2, "store blocks shuffled together, so batches mix shards")
    views: str = setting("all", "which of the store's views students see: all (each epoch one per sample, every "
                         "view once in K epochs) | eval (view 0 only, as a one-view store)")
    allow_partial: bool = setting(False, "train on the finished blocks of an incomplete store (says so)")
    resume: bool = setting(False, "continue the run from the training state it saved (<out-dir>/<run-name>/resume.pt, "
                           "written at the end of every epoch) to the weights an uninterrupted run reaches")
    save_every: int = setting(0, "also save the training state every this many steps (0: at epochs' ends only)")
    device: str = setting("auto", "auto (cuda when available) | cpu | cuda | cuda:N")
    variant: str | None = setting(None, "a study's run: the settings of this entry of the --params file's "
                                  "`variants` (name -> settings) go over its train_student section")

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        check_choice("policy", self.policy, POLICIES)
        check_choice("recipe", self.recipe, tuple(RECIPES))
        defaults = dict(RECIPES[self.recipe]) if self.method == "explain-kd" else {
            "student_map": "gradcam", "kd_source": "selected", "beta": AT_BETA if self.method == "at" else 0.0}
        if self.policy == "global":  # one teacher for logits and maps already
            defaults["kd_source"] = "selected"
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        check_choice("student map", self.student_map, ("gradcam", "attention"))
        check_choice("kd source", self.kd_source, ("selected", "best"))
        check_choice("map norm", self.map_norm, MAP_NORMS)
        check_choice("views", self.views, ("all", "eval"))
        if self.map_size < 0:
            raise PipelineError(f"--map-size must be 0 (the student's map size) or a side length >= 1; got {self.map_size}")
        if self.kd_source == "best" and (self.method != "explain-kd" or self.policy == "global"):
            raise PipelineError("--kd-source best applies to explain-kd with --policy per-sample, weighted, "
                                "correct or random (the others already learn from one teacher's logits); "
                                "drop --kd-source best")


@dataclass
class EvaluateConfig(DataConfig):
    students_dir: str = setting("data_cache/students", "every <run>/checkpoint.pt below it is evaluated")
    teacher_metrics: str = setting("data_cache/teachers/metrics.json", "teacher metrics from train-teachers")
    out: str = setting("data_cache/metrics.json", "metrics JSON to write (read by `dvc metrics show`)")
    target: str = setting("label", "class whose Grad-CAM is scored: label | predicted")
    batch_size: int = setting(256, "evaluation batch size")

    def __post_init__(self):
        check_choice("target", self.target, TARGETS)


@dataclass
class ReportConfig(DataConfig):
    students_dir: str = setting("data_cache/students", "every <run>/checkpoint.pt below it is a run; runs named "
                                "<variant>-s<seed> are grouped by variant")
    out_dir: str = setting("reports", "writes results.csv, results.md, runs.csv and accuracy.png here (with --store "
                           "also drops.png and explanations.png)")
    baseline: str = setting("kd", "variant the paired (same seed) differences are taken against")
    store: str | None = setting(None, "teacher store of the test split (`val` where there is none): draws each "
                                "teacher's confidence drops (drops.png) and the explanation grid (explanations.png)")
    explain_runs: list[str] = setting([], "student runs (<variant>-s<seed>) whose own Grad-CAM maps the "
                                      "explanation grid shows beside the teachers' maps")
    explain_images: int = setting(6, "test images (rows) in the explanation grid")
    metrics: str | None = setting(None, "also write the summary to this JSON file, a DVC metrics file (`dvc metrics "
                                  "show`, `dvc exp show`): per variant its seeds, test mean and std, and the paired "
                                  "difference to the baseline with its 95 % interval")


STAGE_SECTIONS = {
    TrainTeachersConfig: "train_teachers",
    ExtractConfig: "extract_teachers",
    TrainStudentConfig: "train_student",
    EvaluateConfig: "evaluate",
    ReportConfig: "report",
}


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
        values.update(params.get(STAGE_SECTIONS[cls]) or {})
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
            f"unknown {STAGE_SECTIONS[cls]} setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    return cls(**values)
