"""`explain-kd`: per sample, follow the teacher a selection policy picks by its explanation (pipeline.policies):
its logits (or the best held-out teacher's) and its cached map as the target of a student map."""

from pipeline.explain import attention_map, grad_cam
from pipeline.methods.base import METHODS, Method
from pipeline.objective import Term
from pipeline.policies import POLICIES

# Settings of the map and logit targets. `validated` was chosen on validation by the rule docs/studies/index.md wrote
# down before its last benchmarks ran (with --policy weighted, the policy that rule chose: the selected teachers' logits,
# which beat the best teacher's alone; no map term, since the attention-map term at beta 0.5 scored lower); `design`
# is the method's original formulation, which collapses on cluttered-digits at beta 10. Each of the three options
# overrides a recipe; a map term (--beta) takes the student's attention map unless --student-map says otherwise.
RECIPES = {
    "validated": {"student_map": "attention", "kd_source": "selected", "beta": 0.0},
    "design": {"student_map": "gradcam", "kd_source": "selected", "beta": 10.0},
}


@METHODS.add
class ExplainKD(Method):
    name = "explain-kd"
    help = "per sample, the teacher --policy picks by its explanation: logits and Grad-CAM map"
    fields = ("cam", "cam_max", "cam_class", "y_prob", "o_prob")
    follows_policy = True

    def defaults(self, cfg):
        recipe = dict(RECIPES[cfg.recipe])
        return recipe | ({"kd_source": "selected"} if POLICIES.get(cfg.policy).one_teacher else {})

    def check(self, cfg):
        if cfg.kd_source == "best" and POLICIES.get(cfg.policy).one_teacher:
            super().check(cfg)

    def teachers(self, store, teacher, policy):
        return policy.teachers(store, super().teachers(store, teacher, policy))

    def describe(self, cfg, teachers, kd_teacher):
        source = f"{kd_teacher}'s (--kd-source best)" if kd_teacher else "the selected teachers' (--kd-source selected)"
        maps = f"map term beta {cfg.beta} on the student's {cfg.student_map} map" if cfg.beta else "no map term (beta 0)"
        return (f"explain-kd (--recipe {cfg.recipe}) from {', '.join(teachers)}, --policy {cfg.policy}: KD alpha "
                f"{cfg.alpha} at T {cfg.temperature} towards {source} logits; {maps}")

    def double_backward(self, cfg):
        return cfg.beta > 0 and cfg.student_map == "gradcam"  # the student's own Grad-CAM, create_graph=True

    def terms(self, step):
        weights = step.loss.policy.weights(step.evidence())
        terms = {f"chosen/{name}": Term.over(weights[:, m], weight=0.0) for m, name in enumerate(step.teachers)}
        beta = step.loss.beta_now()
        if beta > 0 and step.settings.student_map == "gradcam":
            logits, student_map, _ = grad_cam(step.model, step.x, step.explained_class(weights), step.layer,
                                              create_graph=True, detach_head=step.settings.detach_head)
        else:
            logits, activation = step.forward(need_activation=beta > 0)
            student_map = attention_map(activation) if activation is not None else None
        logits = logits.float()
        kd_weights = weights if step.kd_teacher is None else step.only(step.kd_teacher)  # logits of one, maps per sample
        terms |= {"ce": step.ce(logits), "kd": step.kd(logits, kd_weights)}
        if beta > 0:
            terms["map"] = step.map_term(student_map.float(), weights, "cam", beta)
        return terms

