"""explain-kd's selection policies on hand-computed scores: which teacher each sample follows, and how much."""

import math

import pytest
import torch

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.policies import POLICIES, draws

Y = torch.tensor([[0.99, 0.02, 0.5], [0.5, 0.8, 0.6]])
O = torch.tensor([[0.99, 0.021, 0.25], [0.25, 0.8, 0.3]])  # drops: [0, 0, 0.5], [0.5, 0, 0.5]
CORRECT = torch.tensor([[False, True, True], [False, False, False]])


def weights(policy: str, temperature: float = 0.1, drawn=None) -> torch.Tensor:
    return POLICIES.get(policy)().weights(Y, O, CORRECT, temperature, drawn)


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


def test_random_follows_the_draw_and_the_draw_is_seeded_uniform():
    assert weights("random", drawn=torch.tensor([2, 0])).tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    a, b = draws(30_000, 3, seed=1), draws(30_000, 3, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, draws(30_000, 3, seed=2))
    counts = torch.bincount(a, minlength=3).float() / len(a)
    assert counts.sub(1 / 3).abs().max() < 0.02  # 3 sigma of a share of 30,000 draws is 0.008


def test_global_gives_every_sample_to_its_one_teacher():
    only = POLICIES.get("global")().weights(Y[:, :1], O[:, :1], CORRECT[:, :1], 0.1, None)
    assert only.tolist() == [[1.0], [1.0]]


def test_the_options_choices_and_help_come_from_the_registry():
    from click.testing import CliRunner

    help_text = " ".join(CliRunner().invoke(main, ["train-student", "--help"], terminal_width=400).output.split())
    for name in POLICIES.names():
        assert f"{name} ({POLICIES.get(name).help})" in help_text
    with pytest.raises(PipelineError, match="unknown policy 'best'; choose one of: correct, global, per-sample, "
                                            "random, weighted"):
        POLICIES.get("best")
