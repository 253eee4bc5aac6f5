"""The field's multi-teacher KD losses: per sample, a weighted sum over the teachers of KD towards each one,
(1/B) sum_i sum_k w_ik T^2 KL(p_k,i || p_s,i), with the weights w_ik of the method. They use no explanation:
they are what the explanation-based choice (explain-kd) has to beat.

- `aver`: w_ik = 1/K (CA-MKD's AVERAGE_LOSS baseline). Not `kd-avg`, which is KD towards the mean of the teachers'
  softened outputs (MEAL V2).
- `ca-mkd` (Zhang, Chen and Wang 2022): w_ik = (1 - softmax_k(CE_ik)) / (K - 1), CE_ik teacher k's cross-entropy
  with the label, the softmax taken over the teachers: a teacher that knows the sample weighs more. The weights of a
  sample sum to 1, so alpha means what it means for `kd`; the authors' code also divides the sum by K, which is
  this loss with alpha / K. Their intermediate-feature term is not included.
- `ebkd` (Kwon et al. 2020): w_ik = 1 - H(p_k,i) / sum_j H(p_j,i), H the entropy at T = 1: a sure teacher weighs
  more. These weights sum to K - 1 per sample (1 for two teachers).
"""

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.methods.base import METHODS, Method


class WeightedKD(Method):
    """CE plus the weighted sum of per-teacher KD terms; subclasses say the (B, M) weights."""

    least_teachers = 1

    def teachers(self, store, teacher, policy):
        teachers = super().teachers(store, teacher, policy)
        if len(teachers) < self.least_teachers:
            raise PipelineError(f"{self.name} weighs {self.least_teachers} or more teachers against each other; store "
                                f"{store.location} holds {len(teachers)} ({', '.join(teachers)}): add a teacher with "
                                "`pipeline extract-teachers`, or use --method kd")
        return teachers

    def weights(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, M) weights from the teachers' (B, M, C) float32 logits and the (B,) labels."""
        raise NotImplementedError

    def terms(self, step):
        logits, _ = step.forward()
        weights = self.weights(step.teacher_logits, step.labels)
        return {"ce": step.ce(logits), "kd": step.kd_each(logits, weights)}


@METHODS.add
class Aver(WeightedKD):
    name = "aver"
    help = "the mean over the teachers of KD towards each (CA-MKD's AVERAGE_LOSS)"

    def weights(self, logits, labels):
        return torch.full(logits.shape[:2], 1.0 / logits.shape[1], device=logits.device)


@METHODS.add
class ConfidenceAware(WeightedKD):
    name = "ca-mkd"
    help = "KD towards each teacher weighted (1 - softmax over teachers of its cross-entropy) / (K - 1) (CA-MKD)"
    least_teachers = 2

    def weights(self, logits, labels):
        ce = F.cross_entropy(logits.transpose(1, 2), labels[:, None].expand(-1, logits.shape[1]), reduction="none")
        return (1 - torch.softmax(ce, dim=1)) / (logits.shape[1] - 1)


@METHODS.add
class EntropyBased(WeightedKD):
    name = "ebkd"
    help = "KD towards each teacher weighted 1 - its entropy / the teachers' summed entropy (EBKD)"
    least_teachers = 2

    def weights(self, logits, labels):
        entropy = -(F.softmax(logits, dim=2) * F.log_softmax(logits, dim=2)).sum(2)  # (B, M), at T = 1
        total = entropy.sum(1, keepdim=True)
        share = torch.where(total > 0, entropy / torch.where(total > 0, total, torch.ones_like(total)),
                            torch.full_like(entropy, 1 / entropy.shape[1]))
        return 1 - share  # teachers all certain (no entropy at all): equal shares, as for equal entropies
