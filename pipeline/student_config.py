"""Stage two's config: its own module, as it draws on the method and policy registries (which teacher
training and extraction do not import)."""

from dataclasses import dataclass
from typing import ClassVar

from pipeline.config import FLIP_HELP, MAP_NORMS, DataConfig, ScheduleSettings, check_choice, setting
from pipeline.errors import PipelineError
from pipeline.methods import METHODS
from pipeline.methods.explain_kd import RECIPES
from pipeline.policies import POLICIES
from pipeline.store.location import in_bucket


@dataclass
class TrainStudentConfig(ScheduleSettings, DataConfig):
    section: ClassVar[str] = "train_student"  # its section of params.yaml
    split: str = setting("train", "data set split the store was extracted from")
    store: str = setting("data_cache/stores/digits-train.zarr", "teacher store to learn from")
    method: str = setting("explain-kd", METHODS.described())
    teacher: str | None = setting(None, "kd, at and explain-kd --kd-source best: the one teacher's name (default: "
                                  "the best validation accuracy recorded in the store; never test accuracy)")
    policy: str = setting("weighted", "explain-kd teacher choice (weighted: the highest validation score over the "
                          "studies of specialists and mixed pools, within noise of confidence-weighted and correct, "
                          "below ce; per-sample: the lowest drop, the thesis' rule): " + POLICIES.described())
    policy_temperature: float = setting(0.1, "weighted policy: weights proportional to Y * exp(-drop / t)")
    detach_head: bool = setting(False, "explain-kd: the student map uses detached classifier weights, so the "
                                "map term shapes features only")
    recipe: str = setting("validated", "explain-kd defaults of --student-map, --kd-source and --beta: validated "
                          "(attention, selected, 0: logits alone, by the studies' validation rule; the attention map "
                          "is the student map when --beta asks for one) | design (gradcam, selected, 10: the method's "
                          "original formulation)")
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
    lr: float = setting(0.05, "peak learning rate (SGD, Nesterov momentum 0.9, --lr-schedule)")
    weight_decay: float = setting(5e-4, "L2 weight decay")
    seed: int = setting(0, "seed for initialisation and batch order")
    num_workers: int = setting(0, "DataLoader worker processes streaming store blocks")
    mix_blocks: int = setting(2, "store blocks shuffled together, so batches mix shards")
    views: str = setting("all", "which of the store's views students see: all (each epoch one per sample, every "
                         "view once in K epochs) | eval (view 0 only, as a one-view store)")
    allow_partial: bool = setting(False, "train on the finished blocks of an incomplete store (says so)")
    cache_dir: str | None = setting(None, "a store in a bucket: keep the shard files fetched in this folder for later "
                                    "epochs and runs (concurrent runs may share it)")
    cache_gb: float = setting(50.0, "--cache-dir's bound in GB: past it, the least recently used shard files go")
    resume: bool = setting(False, "continue the run from the training state it saved (<out-dir>/<run-name>/resume.pt, "
                           "written at the end of every epoch) to the weights an uninterrupted run reaches")
    save_every: int = setting(0, "also save the training state every this many steps (0: at epochs' ends only)")
    device: str = setting("auto", "auto (cuda when available) | cpu | cuda | cuda:N")
    compile: bool = setting(False, "capture each full batch's step as one graph with torch.compile (on a GPU with "
                            "CUDA graphs, mode reduce-overhead; on the CPU the eager backend, no faster); steps with "
                            "a double backward (--recipe design's Grad-CAM) run uncaptured and say so")
    variant: str | None = setting(None, "a study's run: the settings of this entry of the --params file's "
                                  "`variants` (name -> settings) go over its train_student section")

    def __post_init__(self):
        method = METHODS.get(self.method)()
        POLICIES.get(self.policy)
        check_choice("recipe", self.recipe, tuple(RECIPES))
        for key, value in method.defaults(self).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        check_choice("student map", self.student_map, ("gradcam", "attention"))
        check_choice("kd source", self.kd_source, ("selected", "best"))
        check_choice("map norm", self.map_norm, MAP_NORMS)
        check_choice("views", self.views, ("all", "eval"))
        if self.cache_dir and not in_bucket(self.store):
            raise PipelineError(f"--cache-dir keeps shard files fetched from a bucket, and store {self.store} is a "
                                "folder; leave --cache-dir out")
        if self.cache_gb <= 0:
            raise PipelineError(f"--cache-gb must be above 0; got {self.cache_gb}")
        if self.map_size < 0:
            raise PipelineError(f"--map-size must be 0 (the student's map size) or a side length >= 1; got {self.map_size}")
        method.check(self)
        self.lr_schedule_of()
