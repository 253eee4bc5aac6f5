"""`ce`: cross-entropy on the labels alone, the baseline that learns from no teacher."""

from pipeline.methods.base import METHODS, Method


@METHODS.add
class CrossEntropy(Method):
    name = "ce"
    help = "labels only"
    reads_logits = False

    def teachers(self, store, teacher, policy):
        return []

    def describe(self, cfg, teachers, kd_teacher):
        return "ce: cross-entropy on the labels, no teacher"

    def terms(self, step):
        logits, _ = step.forward()
        return {"ce": step.ce(logits)}
