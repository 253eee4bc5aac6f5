"""`kd-avg`: knowledge distillation from the mean of every teacher's softened outputs."""

from pipeline.methods.base import METHODS, Method
from pipeline.methods.kd import KnowledgeDistillation


@METHODS.add
class AveragedTargets(Method):
    name = "kd-avg"
    help = "the mean of the teachers' softened outputs"
    terms = KnowledgeDistillation.terms  # kd's loss; its target, the equal mix, spans every teacher here
