"""`at`: attention transfer (Zagoruyko and Komodakis) from one teacher, plus its logits."""

from pipeline.explain import attention_map
from pipeline.methods.base import METHODS, OneTeacher

AT_BETA = 1.0  # the map weight the cluttered-digits study validated (its variant at-b1)


@METHODS.add
class AttentionTransfer(OneTeacher):
    name = "at"
    help = "one teacher's logits and attention map (mean of squared activations)"
    fields = ("attention", "attention_max")

    def defaults(self, cfg):
        return super().defaults(cfg) | {"beta": AT_BETA}

    def describe(self, cfg, teachers, kd_teacher):
        return f"{super().describe(cfg, teachers, kd_teacher)}; attention-map term beta {cfg.beta}"

    def terms(self, step):
        logits, activation = step.forward(need_activation=True)
        weights = step.uniform()
        return {"ce": step.ce(logits), "kd": step.kd(logits, weights),
                "map": step.map_term(attention_map(activation), weights, "attention", step.loss.beta_now())}
