"""The field's multi-teacher losses (aver, ca-mkd, ebkd) against their formulas written out in plain floats for a
batch of two samples and three teachers, and each training a student on a digits store."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import distillation, invoke
from pipeline.errors import PipelineError
from pipeline.methods import method_of
from pipeline.objective import loss_of

T, ALPHA, LABELS = 4.0, 0.7, [2, 0]
STUDENT = [[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]]
TEACHERS = {"t1": [[0.0, 0.0, 3.0], [2.0, 1.0, 0.0]],  # right on both, sure of sample 0
            "t2": [[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]],  # wrong on sample 0, knows nothing of sample 1
            "t3": [[-1.0, 0.0, 1.5], [0.5, 2.5, 0.0]]}  # right on 0, wrong on 1


def softmax(values, temperature=1.0):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def kl_t(teacher, student):
    """T^2 KL(softmax(t/T) || softmax(s/T))."""
    p, q = softmax(teacher, T), softmax(student, T)
    return T * T * sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q))


def expected_kd(weights_of) -> float:
    """(1/B) sum_i sum_k w_ik KL_T(p_k,i || p_s,i), the weights of sample i from `weights_of(i)`."""
    rows = [sum(w * kl_t(TEACHERS[t][i], STUDENT[i]) for w, t in zip(weights_of(i), TEACHERS)) for i in range(2)]
    return sum(rows) / len(rows)


def ca_mkd_weights(i):
    ce = [-math.log(softmax(TEACHERS[t][i])[LABELS[i]]) for t in TEACHERS]
    return [(1 - e) / (len(ce) - 1) for e in softmax(ce)]


def ebkd_weights(i):
    entropy = [-sum(p * math.log(p) for p in softmax(TEACHERS[t][i])) for t in TEACHERS]
    return [1 - h / sum(entropy) for h in entropy]


class FixedLogits(nn.Module):
    """A 'student' whose logits are STUDENT whatever the input."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(STUDENT))

    def forward(self, x):
        return self.logits * torch.ones_like(x[:, :1, 0, 0])


def batch():
    rows = {"images": torch.zeros(2, 8, 8, 1, dtype=torch.uint8), "labels": torch.tensor(LABELS),
            "index": torch.tensor([0, 1])}
    return rows | {f"teachers/{t}/logits": torch.tensor(logits).half() for t, logits in TEACHERS.items()}


@pytest.mark.parametrize("method, weights_of", [("aver", lambda i: [1 / 3] * 3), ("ca-mkd", ca_mkd_weights),
                                                ("ebkd", ebkd_weights)])
def test_the_kd_term_is_the_weighted_sum_of_each_teachers_kd_by_hand(method, weights_of):
    terms = distillation(method, list(TEACHERS), None, temperature=T, alpha=ALPHA, num_classes=3)(FixedLogits(), batch())
    assert set(terms) == {"ce", "kd"} and terms["kd"].weight == ALPHA
    assert terms["kd"].mean.item() == pytest.approx(expected_kd(weights_of), rel=1e-5)
    ce = sum(-math.log(softmax(STUDENT[i])[LABELS[i]]) for i in range(2)) / 2
    assert loss_of(terms).item() == pytest.approx(ce + ALPHA * expected_kd(weights_of), rel=1e-5)


def teacher_logits():
    return torch.tensor([TEACHERS[t] for t in TEACHERS]).transpose(0, 1)  # (B, K, C)


def test_the_weights_favour_the_teacher_that_knows_the_sample():
    ca_mkd = method_of("ca-mkd").weights(teacher_logits(), torch.tensor(LABELS))
    assert ca_mkd.tolist() == [pytest.approx(ca_mkd_weights(i)) for i in range(2)]
    # sample 1: t1 is right and sure, t2 uniform, t3 wrong: CA-MKD ranks them t1 > t2 > t3 by cross-entropy
    assert ca_mkd[1, 0] > ca_mkd[1, 1] > ca_mkd[1, 2] and ca_mkd.sum(1).tolist() == pytest.approx([1.0, 1.0])
    ebkd = method_of("ebkd").weights(teacher_logits(), torch.tensor(LABELS))
    assert ebkd.tolist() == [pytest.approx(ebkd_weights(i)) for i in range(2)]
    # EBKD's weights sum to K - 1 = 2; the uniform teacher (largest entropy) weighs least
    assert ebkd[1].argmin() == 1 and ebkd.sum(1).tolist() == pytest.approx([2.0, 2.0])


def test_ebkd_shares_equally_among_teachers_with_no_entropy_at_all():
    certain = torch.tensor([[[1000.0, 0.0, 0.0], [0.0, 1000.0, 0.0]]])  # two one-hot teachers: entropy 0 each
    assert method_of("ebkd").weights(certain, torch.tensor([0])).tolist() == [[0.5, 0.5]]  # K - 1 = 1 in all
    # margins of 75 to 90: entropies of about 1e-31, above 0 yet below any clamp; still equal shares, summing to 1
    for margin in (75.0, 80.0, 90.0):
        sure = torch.tensor([[[margin, 0.0, 0.0], [0.0, margin, 0.0]]])
        assert method_of("ebkd").weights(sure, torch.tensor([0])).tolist() == [[0.5, 0.5]], margin


def test_aver_is_not_kd_avg():
    """KD towards each teacher, averaged, is KD towards the mean output plus the teachers' spread (KL is convex):
    the two differ on teachers that disagree."""
    aver = distillation("aver", list(TEACHERS), None, temperature=T, num_classes=3)(FixedLogits(), batch())
    avg = distillation("kd-avg", list(TEACHERS), None, temperature=T, num_classes=3)(FixedLogits(), batch())
    assert aver["kd"].mean.item() > avg["kd"].mean.item() + 0.1


@pytest.mark.parametrize("method", ["ca-mkd", "ebkd"])
def test_methods_that_weigh_teachers_against_each_other_refuse_one_teacher(method):
    store = SimpleNamespace(location="one.zarr", teachers=["t1"])
    with pytest.raises(PipelineError, match=f"{method} weighs 2 or more teachers against each other; store one.zarr "
                                            r"holds 1 \(t1\)"):
        method_of(method).teachers(store, None, None)


SLOW = pytest.mark.slow  # the policies' runs: the full set (CI) trains each, the default set the methods and drop-z


@pytest.mark.parametrize("args", [["--method", "aver"], ["--method", "ca-mkd"], ["--method", "ebkd"],
                                  ["--policy", "drop-z"],  # a policy fitted to the store, in the default set
                                  *(pytest.param(["--policy", policy], marks=SLOW) for policy in (
                                      "confident", "masked", "drop-rank", "agreement", "random-batch"))],
                         ids=lambda args: args[1])
def test_each_trains_a_student_on_the_digits_store(args, digits_test_store, tmp_path):
    result = invoke("train-student", "--split", "test", "--store", digits_test_store, *args, "--epochs", 1,
                    "--batch-size", 128, "--out-dir", tmp_path, "--run-name", "run", "--beta", 0.5)
    assert (tmp_path / "run/checkpoint.pt").is_file(), result.output
    assert f"recipe: {args[1] if args[0] == '--method' else 'explain-kd'} " in result.output  # the log says the recipe
    assert args[0] == "--method" or f"--policy {args[1]}:" in result.output
    history = torch.load(tmp_path / "run/checkpoint.pt", weights_only=False)["history"]
    assert math.isfinite(history[-1]["loss"])
