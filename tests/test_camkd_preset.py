"""What the CA-MKD CIFAR-100 protocol needs: the CRD code's resnet32x4 and vgg8 (parameter counts by formula), the
step learning-rate schedule (by hand), and the preset's own commands run for a few steps on fabricated CIFAR-100
files."""

import math
import re

import pytest
import torch
import yaml

from conftest import invoke
from pipeline.fabricate import make_cifar
from pipeline.models import count_parameters, create_model
from pipeline.objective import Term
from pipeline.train import LrSchedule, fit

PRESET = "studies/cifar100-camkd/params.yaml"


def basic_block(c_in: int, c_out: int) -> int:
    """Two 3x3 convs without bias, two BNs, a 1x1 conv + BN shortcut where the width changes."""
    return 9 * c_in * c_out + 9 * c_out * c_out + 4 * c_out + (c_in * c_out + 2 * c_out if c_in != c_out else 0)


def test_resnet32x4_and_vgg8_have_the_crd_codes_parameter_counts():
    stem = 3 * 32 * 9 + 2 * 32
    stages = sum(basic_block(c_in, width) + 4 * basic_block(width, width)
                 for c_in, width in ((32, 64), (64, 128), (128, 256)))
    assert count_parameters(create_model("resnet32x4", 3, 100)) == stem + stages + 256 * 100 + 100 == 7_433_860
    widths = (3, 64, 128, 256, 512, 512)
    convs = sum(9 * a * b + b + 2 * b for a, b in zip(widths, widths[1:]))  # conv with bias, BN
    assert count_parameters(create_model("vgg8", 3, 100)) == convs + 512 * 100 + 100 == 3_965_028
    # 7.43 M and 3.97 M: the published sizes of the CRD benchmark's resnet32x4 and vgg8
    assert create_model("vgg8", 3, 100)(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_the_step_schedule_multiplies_the_rate_after_each_milestone_epoch():
    factor = LrSchedule("step", (2, 4), 0.1).factor(lambda epoch: 3, 5)  # 3 steps an epoch
    assert [factor(step) for step in range(15)] == pytest.approx([1.0] * 6 + [0.1] * 6 + [0.01] * 3)
    cosine = LrSchedule().factor(lambda epoch: 3, 5)
    assert cosine(0) == 1.0 and cosine(15) == pytest.approx(0.0) and cosine(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 15)))


def test_fit_follows_the_step_schedule_epoch_by_epoch():
    model = torch.nn.Linear(2, 2)
    batches = lambda epoch: [{"x": torch.ones(4, 2), "y": torch.zeros(4, dtype=torch.long)}] * 2  # noqa: E731
    loss = lambda m, b: {"ce": Term.over(torch.nn.functional.cross_entropy(m(b["x"]), b["y"], reduction="none"))}  # noqa: E731
    history = fit(model, batches, loss, epochs=4, steps_per_epoch=lambda epoch: 2, lr=0.05, weight_decay=0.0, desc="t",
                  schedule=LrSchedule("step", (1, 3), 0.5))
    assert [row["lr"] for row in history] == pytest.approx([0.05, 0.025, 0.025, 0.0125])


@pytest.mark.parametrize("schedule, milestones, decay, message", [
    ("step", "", 0.1, "--lr-milestones go with --lr-schedule step, and step needs them"),
    ("cosine", "3", 0.1, "go with --lr-schedule step"), ("linear", "", 0.1, "unknown learning-rate schedule 'linear'"),
    ("step", "ten", 0.1, "--lr-milestones takes whole numbers, e.g. 150,180,210"),
    ("step", "8", 0.1, "distinct epochs from 1 to 7 \\(of --epochs 8: a later one never applies\\); got \\[8\\]"),
    ("step", "2,2", 0.1, "distinct epochs"), ("step", "2", 1.5, "--lr-decay must be between 0 and 1")])
def test_a_schedule_that_cannot_apply_is_refused_in_one_line(schedule, milestones, decay, message, tmp_path):
    result = invoke("train-teachers", "--lr-schedule", schedule, "--lr-milestones", milestones, "--lr-decay", decay,
                    "--epochs", 8, "--out-dir", tmp_path, exit_code=1)
    assert len(result.output.strip().splitlines()) == 1
    assert re.search(message, result.output), result.output


def test_two_teachers_of_one_name_are_refused_and_seeds_name_them(tmp_path):
    result = invoke("train-teachers", "--teachers", "resnet8,resnet8", "--out-dir", tmp_path, exit_code=1)
    assert "name one checkpoint twice; give each its own seed: <arch>@<seed>" in result.output
    result = invoke("train-teachers", "--teachers", "resnet8@x", "--out-dir", tmp_path, exit_code=1)
    assert "write <arch>@<seed> with a whole-number seed, e.g. resnet8@1" in result.output


@pytest.mark.slow
def test_the_presets_commands_run_a_few_steps_on_fabricated_cifar100(tmp_path):
    """The preset as it is, but for the paths, 2 epochs (milestone after the first) and 8 fabricated images."""
    preset = yaml.safe_load(open(PRESET))
    root = make_cifar(tmp_path / "data", "cifar100", per_batch=8)
    params = {**preset, "data": {**preset["data"], "data_root": str(root)}}
    params["train_teachers"] |= {"out_dir": str(tmp_path / "teachers"), "epochs": 2, "lr_milestones": [1]}
    params["extract_teachers"] |= {"teachers": [str(tmp_path / f"teachers/resnet32x4-s{s}.pt") for s in range(3)],
                                   "store": str(tmp_path / "train.zarr")}
    params["train_student"] |= {"store": str(tmp_path / "train.zarr"), "out_dir": str(tmp_path / "students"),
                                "epochs": 2, "lr_milestones": [1]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    invoke("train-teachers", "--params", tmp_path / "params.yaml")
    teachers = [torch.load(tmp_path / f"teachers/resnet32x4-s{s}.pt", weights_only=False) for s in range(3)]
    assert [t["name"] for t in teachers] == ["resnet32x4-s0", "resnet32x4-s1", "resnet32x4-s2"]
    assert [row["lr"] for row in teachers[0]["history"]] == pytest.approx([0.05, 0.005])
    assert not torch.equal(teachers[0]["state_dict"]["fc.weight"], teachers[1]["state_dict"]["fc.weight"])  # seeds
    invoke("extract-teachers", "--params", tmp_path / "params.yaml")
    for variant in ("ca-mkd", "ekd-b0"):
        result = invoke("train-student", "--params", tmp_path / "params.yaml", "--variant", variant,
                        "--run-name", f"{variant}-s0")
        assert "recipe: " in result.output
        student = torch.load(tmp_path / f"students/{variant}-s0/checkpoint.pt", weights_only=False)
        assert student["arch"] == "vgg8" and [row["lr"] for row in student["history"]] == pytest.approx([0.05, 0.005])
