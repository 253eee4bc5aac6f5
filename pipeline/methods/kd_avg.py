"""`kd-avg`: knowledge distillation from the mean of every teacher's softened outputs."""

from pipeline.methods.base import METHODS, Method


@METHODS.add
class AveragedTargets(Method):
    name = "kd-avg"
    help = "the mean of the teachers' softened outputs"

    def terms(self, step):
        logits, _ = step.forward()
        return {"ce": step.ce(logits), "kd": step.kd(logits, step.uniform())}
