"""What a student method is: the store fields it reads, the teachers it learns from, its defaults and its loss.

Each method is one class in its own module, registered in `METHODS` under its `--method` name; its loss is
written against a `Step` (pipeline.distill), which holds a batch and the pieces every method shares.
"""

from typing import TYPE_CHECKING

from pipeline.errors import PipelineError
from pipeline.heldout import named_or_best_teacher
from pipeline.objective import Term
from pipeline.policies import POLICIES
from pipeline.registry import Registry
from pipeline.store.layout import teacher_arrays

if TYPE_CHECKING:
    from pipeline.distill import Step


class Method:
    name = ""  # its --method name
    help = ""
    fields: tuple[str, ...] = ()  # what it reads of each teacher, besides the logits
    reads_logits = True
    follows_policy = False  # whether --policy chooses its teachers per sample
    one_teacher = False  # whether it learns from one teacher

    def teacher_fields(self, logit_fields: tuple[str, ...]) -> tuple[str, ...]:
        """Each teacher's store arrays it reads (`logit_fields`: the store's logits mode)."""
        return (*logit_fields, *self.fields) if self.reads_logits else self.fields

    def arrays(self, teachers: list[str], logit_fields: tuple[str, ...]) -> list[str]:
        """The store arrays it reads of `teachers`, teacher by teacher."""
        return teacher_arrays(teachers, self.teacher_fields(logit_fields))

    def defaults(self, cfg) -> dict:
        """Settings a run leaves unset (None) take these."""
        return {"student_map": "gradcam", "kd_source": "selected", "beta": 0.0}

    def check(self, cfg) -> None:
        """Refuse settings the method cannot honour, in one line."""
        if cfg.kd_source == "best":
            per_sample = [name for name in POLICIES.names() if not POLICIES.get(name).one_teacher]
            raise PipelineError(f"--kd-source best applies to explain-kd with --policy {' | '.join(per_sample)} (the "
                                "others already learn from one teacher's logits); drop --kd-source best")

    def teachers(self, store, teacher: str | None, policy) -> list[str]:
        """The store teachers it learns from (`teacher`: the one named by --teacher)."""
        if not store.teachers:
            raise PipelineError(f"store {store.location} holds no teachers; run `pipeline extract-teachers` first")
        return store.teachers

    def describe(self, cfg, teachers: list[str], kd_teacher: str | None) -> str:
        """What a run of `cfg` learns, for its log: the recipe, settled (defaults filled, teachers chosen)."""
        return f"{self.name} from {', '.join(teachers)}: KD alpha {cfg.alpha} at T {cfg.temperature}"

    def double_backward(self, cfg) -> bool:
        """Whether its step differentiates a gradient (which torch.compile does not capture: it runs eager)."""
        return False

    def terms(self, step: "Step") -> dict[str, Term]:
        raise NotImplementedError


class OneTeacher(Method):
    """A method that learns from one teacher: the named one, or the best on the held-out split."""

    one_teacher = True

    def teachers(self, store, teacher, policy):
        super().teachers(store, teacher, policy)
        return [named_or_best_teacher(store, teacher, self.name)]


METHODS: Registry[type[Method]] = Registry("method")
