"""`kd`: Hinton's knowledge distillation from one teacher's logits."""

from pipeline.methods.base import METHODS, OneTeacher


@METHODS.add
class KnowledgeDistillation(OneTeacher):
    name = "kd"
    help = "one teacher's logits: --teacher, or the best on the held-out split"

    def terms(self, step):
        logits, _ = step.forward()
        return {"ce": step.ce(logits), "kd": step.kd(logits, step.uniform())}
