"""explain-kd's selection policies on hand-computed scores: which teacher each sample follows, and how much."""

import math

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.evidence import Evidence
from pipeline.policies import POLICIES, draws

Y = torch.tensor([[0.99, 0.02, 0.5], [0.5, 0.8, 0.6]])
O = torch.tensor([[0.99, 0.021, 0.25], [0.25, 0.8, 0.3]])  # drops: [0, 0, 0.5], [0.5, 0, 0.5]
CORRECT = torch.tensor([[False, True, True], [False, False, False]])


def evidence(y=Y, o=O, correct=CORRECT, rows=(0, 1), maps=()) -> Evidence:
    return Evidence(torch.as_tensor(y), torch.as_tensor(o), torch.as_tensor(correct), torch.tensor(rows), lambda: maps)


def weights(policy: str, temperature: float = 0.1, drawn=None, **values) -> torch.Tensor:
    chosen = POLICIES.get(policy)(temperature)
    chosen.drawn = drawn
    return chosen.weights(evidence(**values))


def test_per_sample_follows_the_lowest_drop_and_ties_go_to_the_more_confident():
    # row 0: teachers 0 and 1 both drop 0, teacher 0 is 99 % sure, teacher 1 2 %; row 1: teacher 1 alone drops 0
    assert weights("per-sample").tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def test_correct_chooses_among_the_teachers_that_classify_the_sample_right():
    # row 0: teachers 1 and 2 are right, drops 0 and 0.5 -> 1; row 1: none is right, so all count -> 1
    assert weights("correct").tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]


def test_weighted_is_proportional_to_confidence_times_exp_of_minus_drop_over_t():
    row0 = torch.tensor([0.99, 0.02, 0.5 * math.exp(-5)])  # Y * exp(-drop / 0.1)
    row1 = torch.tensor([0.5 * math.exp(-5), 0.8, 0.6 * math.exp(-5)])
    torch.testing.assert_close(weights("weighted"), torch.stack([row0 / row0.sum(), row1 / row1.sum()]))
    assert weights("weighted")[0, 1] < 0.02  # the unsure teacher gets almost nothing


def test_confidence_weighted_is_weighted_without_the_drop():
    # Y / sum(Y) by hand: row 0 sums to 1.51, row 1 to 1.9; where every drop is equal, weighted gives the same
    torch.testing.assert_close(weights("confidence-weighted"),
                               torch.tensor([[0.99 / 1.51, 0.02 / 1.51, 0.5 / 1.51], [0.5 / 1.9, 0.8 / 1.9, 0.6 / 1.9]]))
    same_drops = dict(y=[[0.9, 0.3]], o=[[0.45, 0.15]], correct=[[True, True]], rows=(0,))  # both drop 0.5
    torch.testing.assert_close(weights("confidence-weighted", **same_drops), torch.tensor([[0.75, 0.25]]))
    torch.testing.assert_close(weights("weighted", **same_drops), torch.tensor([[0.75, 0.25]]))
    assert POLICIES.get("confidence-weighted").mixes_maps  # refused, as weighted, on a store of predicted maps


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_a_temperature_not_above_zero_is_refused(temperature):
    with pytest.raises(PipelineError, match=f"--policy-temperature must be above 0; got {temperature}"):
        POLICIES.get("weighted")(temperature)  # every command builds its policies here


def test_random_follows_the_draw_and_the_draw_is_seeded_uniform():
    assert weights("random", drawn=torch.tensor([2, 0])).tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    a, b = draws(30_000, 3, seed=1), draws(30_000, 3, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, draws(30_000, 3, seed=2))
    counts = torch.bincount(a, minlength=3).float() / len(a)
    assert counts.sub(1 / 3).abs().max() < 0.02  # 3 sigma of a share of 30,000 draws is 0.008


def test_global_gives_every_sample_to_its_one_teacher():
    only = weights("global", y=Y[:, :1], o=O[:, :1], correct=CORRECT[:, :1])
    assert only.tolist() == [[1.0], [1.0]]


def test_the_options_choices_and_help_come_from_the_registry():
    help_text = " ".join(CliRunner().invoke(main, ["train-student", "--help"], terminal_width=400).output.split())
    for name in POLICIES.names():
        assert f"{name} ({POLICIES.get(name).help})" in help_text
    with pytest.raises(PipelineError, match="unknown policy 'best'; choose one of: agreement, confidence-weighted, "
                                            "confident, correct, "
                                            "drop-rank, drop-z, global, masked, per-sample, random, random-batch, "
                                            "weighted"):
        POLICIES.get("best")


# Y 0.9 and 0.3; masked, O 0.5 and 0.3: teacher 0 drops 0.444, teacher 1 nothing
SURE, UNSURE = dict(y=[[0.9, 0.3]], o=[[0.5, 0.3]], correct=[[True, True]], rows=(0,)), [[0.0, 1.0]]


def test_confident_and_masked_follow_the_largest_y_and_o_where_the_lowest_drop_would_not():
    assert weights("per-sample", **SURE).tolist() == UNSURE
    assert weights("confident", **SURE).tolist() == [[1.0, 0.0]]  # Y 0.9 > 0.3
    assert weights("masked", **SURE).tolist() == [[1.0, 0.0]]  # O 0.5 > 0.3
    # rows 0 and 1 of the module's example: Y's largest are teachers 0 and 1, O's too (0.99; 0.8)
    assert weights("confident").tolist() == weights("masked").tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


@pytest.mark.parametrize("policy", ["drop-z", "drop-rank"])
def test_per_teacher_drops_remove_an_architectures_offset(policy):
    """Teacher 0's drops over the store are 0.5, 0.625, 0.75 and teacher 1's 0, 0.25, 0.5: a drop of 0.5 is
    teacher 0's best (z -1, mid-rank 1/6) and 0.25 is teacher 1's middle one (z 0, mid-rank 3/6), so teacher 0
    wins the row though its raw drop is twice teacher 1's. (Binary fractions: the drops compare exactly.)"""
    row = dict(y=[[0.5, 0.5]], o=[[0.25, 0.375]], correct=[[True, True]], rows=(0,))  # drops 0.5 and 0.25
    assert weights("per-sample", **row).tolist() == [[0.0, 1.0]]
    chosen = POLICIES.get(policy)()
    chosen.drops = [torch.tensor([0.5, 0.625, 0.75]), torch.tensor([0.0, 0.25, 0.5])]
    expected = [[-1.0, 0.0]] if policy == "drop-z" else [[1 / 6, 3 / 6]]
    torch.testing.assert_close(chosen.score(evidence(**row)), torch.tensor(expected))
    assert chosen.weights(evidence(**row)).tolist() == [[1.0, 0.0]]


def test_agreement_follows_the_map_closest_to_the_others_on_the_coarsest_grid():
    """Teachers 0 and 1 light the top-left cell, teacher 2 (a 4x4 map) the bottom-right quarter, which is the
    bottom-right cell on the 2x2 grid: 0 and 1 each have cosine 1/sqrt(2) to the mean of the other two, teacher 2
    has 0. The tie of 0 and 1 goes to the larger Y, teacher 1's."""
    corner = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    quarter = torch.zeros(1, 4, 4)
    quarter[0, 2:, 2:] = 1.0
    row = dict(y=[[0.3, 0.6, 0.9]], o=[[0.3, 0.6, 0.9]], correct=[[True] * 3], rows=(0,), maps=[corner, corner, quarter])
    chosen = POLICIES.get("agreement")()
    torch.testing.assert_close(chosen.score(evidence(**row)), -torch.tensor([[0.5**0.5, 0.5**0.5, 0.0]]))
    index, tied = chosen.choice(evidence(**row))
    assert index.tolist() == [1] and tied.tolist() == [True]


def test_random_batch_gives_the_whole_batch_the_draw_of_its_first_row():
    drawn = torch.tensor([2, 0, 1, 1])
    assert weights("random-batch", drawn=drawn, rows=(1, 0)).tolist() == [[1.0, 0.0, 0.0]] * 2  # row 1 drew 0
    assert weights("random-batch", drawn=drawn, rows=(0, 1)).tolist() == [[0.0, 0.0, 1.0]] * 2  # row 0 drew 2


@pytest.mark.parametrize("policy", [name for name in POLICIES.names() if name != "agreement"])
def test_every_policys_weights_stay_on_the_evidences_device(policy):
    """Training weighs on the GPU: a policy that built its weights on the CPU would stop the first step there (or
    keep a captured step off CUDA graphs), so what `fit` took moves to the device with `to`. The
    meta device stands in for it (no values, only where tensors live; `agreement`, whose scores are computed from
    the maps themselves, resizes them under an autocast context that the meta device has not)."""
    meta = Evidence(Y.to("meta"), O.to("meta"), CORRECT.to("meta"), torch.tensor([0, 1]),
                    lambda: [torch.ones(2, 2, 2, device="meta")] * 3)
    chosen = POLICIES.get(policy)()
    chosen.drawn, chosen.drops = torch.tensor([2, 0]), [torch.tensor([0.0, 0.5, 1.0])] * 3  # as `fit` leaves them
    chosen.to(torch.device("meta"))  # as train-student moves them
    only = policy == "global"  # one teacher, chosen before training
    evidence = Evidence(meta.y[:, :1], meta.o[:, :1], meta.correct[:, :1], meta.rows, meta.maps) if only else meta
    assert chosen.weights(evidence).device.type == "meta"
    assert all(part.device.type == "meta" for part in chosen.choice(evidence))
