"""shape-domains (one set of classes drawn three ways), specialists trained on a part of the data
(`train-teachers --domain`, `--classes`), and `pipeline groups`, the --groups file of `store selection`."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import invoke
from pipeline.data import domains, get_dataset, normalize
from pipeline.models.checkpoint import load_checkpoint

DOMAINS = ("solid", "outline", "texture")


@pytest.fixture(scope="module")
def splits():
    return {s: get_dataset("shape-domains", s) for s in ("train", "val", "test")}


def index_of(sample_id: str) -> int:
    return int(sample_id.rsplit("-", 1)[1])


def test_splits_are_disjoint_balanced_and_each_sample_has_the_class_and_domain_of_its_index(splits):
    assert [len(d) for d in splits.values()] == [3600, 1200, 2400]
    ids = [set(d.ids) for d in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for data in splits.values():  # sample i: class i mod 10, domain (i div 10) mod 3, as the module says
        index = np.array([index_of(i) for i in data.ids])
        assert np.array_equal(data.labels, index % 10)
        assert list(data.groups) == [DOMAINS[(i // 10) % 3] for i in index]
    cells = pd.crosstab(splits["test"].labels, splits["test"].groups)
    assert (cells.to_numpy() == 2400 // 30).all()  # every class x domain cell alike


@pytest.mark.slow  # 7,200 renders: CI runs it
def test_no_object_is_drawn_twice(monkeypatch):
    """Noise alone would make every image unique: without it, every object still differs from every other."""
    monkeypatch.setattr(domains, "NOISE_SIGMA", 0.0)
    y, domain = domains.labels_and_domains()
    drawn = np.stack([domains.render(i, int(y[i]), int(domain[i])) for i in range(domains.SAMPLES)])
    assert len(np.unique(drawn.reshape(domains.SAMPLES, -1), axis=0)) == domains.SAMPLES


def test_splits_are_deterministic(splits):
    assert np.array_equal(get_dataset("shape-domains", "val").images, splits["val"].images)


def test_each_domain_draws_its_own_way(splits):
    data = splits["train"]
    light = data.images.mean(3) / 255  # (N, 32, 32)
    blocks = light.reshape(len(data), 4, 8, 4, 8).mean((2, 4)).std((1, 2))  # how much 8x8 block means differ
    by = {d: data.groups == d for d in DOMAINS}
    # solid: a bright shape on a dark ground; outline: a thin dark stroke on a light ground
    assert np.median(light[by["solid"]], axis=(1, 2)).max() < 0.4
    assert ((light[by["solid"]] > 0.5).sum((1, 2)) >= 30).all()
    assert (np.median(light[by["outline"]], axis=(1, 2)) > 0.6).all()
    dark = (light[by["outline"]] < 0.4).mean((1, 2))
    assert 0.03 < dark.min() and dark.max() < 0.35
    # texture: the same two colours in and out, so no region is brighter than another at the scale of the shape
    assert np.median(blocks[by["texture"]]) < np.median(blocks[by["solid"]]) / 2


@pytest.mark.slow  # a teacher trained and evaluated on shape-domains: CI runs it (the class specialist is fast)
def test_a_domain_specialist_learns_its_domain_only_and_is_named_after_it(tmp_path, splits):
    out = tmp_path / "teachers"
    printed = invoke("train-teachers", "--dataset", "shape-domains", "--teachers", "resnet8_slim", "--domain", "solid",
                     "--epochs", 1, "--out-dir", out).output
    assert "teacher resnet8_slim-solid:" in printed
    model, record = load_checkpoint(out / "resnet8_slim-solid.pt")
    model.eval()
    solid = {d: np.array([(index_of(i) // 10) % 3 == 0 for i in data.ids]) for d, data in splits.items()}  # by index
    assert record["dataset"] == splits["train"].subset(np.flatnonzero(solid["train"])).identity()  # those rows only
    assert record["dataset"]["num_samples"] == 1200 and record["num_classes"] == 10  # the head keeps every class
    test = splits["test"]
    for d, rows in (("solid", solid["test"]), ("others", ~solid["test"])):
        with torch.no_grad():
            logits = model(normalize(torch.from_numpy(test.images[rows]), test.info.mean, test.info.std))
        right = (logits.argmax(1).numpy() == test.labels[rows]).mean()
        if d == "solid":
            assert record["metrics"]["top1_solid"] == pytest.approx(right)
        else:
            others = [record["metrics"][f"top1_{o}"] for o in ("outline", "texture")]
            assert np.mean(others) == pytest.approx(right)  # equal-sized domains
    assert "val_top1" in record["metrics"]


def test_a_class_specialist_learns_its_classes_only(tmp_path):
    out = tmp_path / "teachers"
    invoke("train-teachers", "--teachers", "resnet8_slim@3", "--classes", "4,0,2", "--epochs", 1, "--out-dir", out)
    _, record = load_checkpoint(out / "resnet8_slim-s3-c0_2_4.pt")
    labels = get_dataset("digits", "train").labels
    assert record["dataset"]["num_samples"] == sum(int(label) in (0, 2, 4) for label in labels)
    assert record["num_classes"] == 10 and record["seed"] == 3
    invoke("train-teachers", "--teachers", "resnet8_slim", "--classes", "5", "--epochs", 1, "--out-dir", out)
    metrics = json.loads((out / "metrics.json").read_text())  # the first specialist's figures are kept
    assert sorted(metrics) == ["resnet8_slim-c5", "resnet8_slim-s3-c0_2_4"]
    assert metrics["resnet8_slim-s3-c0_2_4"] == record["metrics"]
    (out / "resnet8_slim-c5.pt").unlink()  # a teacher whose checkpoint is gone loses its figures at the next run
    invoke("train-teachers", "--teachers", "resnet8_slim", "--classes", "6", "--epochs", 1, "--out-dir", out)
    assert sorted(json.loads((out / "metrics.json").read_text())) == ["resnet8_slim-c6", "resnet8_slim-s3-c0_2_4"]


@pytest.mark.parametrize("args, message", [
    (["--domain", "solid"], "--domain solid: data set 'digits' has no domains; shape-domains has"),
    (["--dataset", "shape-domains", "--domain", "sketch"],
     "--domain sketch: not a domain of shape-domains; choose one of: outline, solid, texture"),
    (["--classes", "3,10"], "--classes: 10 is not a class of digits (0 to 9)"),
    (["--classes", "3,x"], "--classes takes whole numbers, e.g. 0,1,2; got 3,x"),
])
def test_a_specialty_the_data_cannot_give_stops_in_one_line(tmp_path, args, message):
    printed = invoke("train-teachers", "--teachers", "resnet8_slim", "--epochs", 1, "--out-dir", tmp_path, *args,
                     exit_code=1).output
    assert f"Error: {message}" in printed and not list(tmp_path.iterdir())


def test_groups_writes_the_domains_or_named_class_groups(tmp_path, splits):
    invoke("groups", "--dataset", "shape-domains", "--split", "test", "--out", tmp_path / "domains.csv")
    table = pd.read_csv(tmp_path / "domains.csv")
    assert list(table.columns) == ["id", "group"]
    assert list(table.group) == [DOMAINS[(index_of(i) // 10) % 3] for i in table.id]
    assert list(table.id) == list(splits["test"].ids)

    printed = invoke("groups", "--dataset", "digits", "--class-group", "low=0,1,2", "--class-group", "high=8,9",
                     "--out", tmp_path / "classes.csv").output
    table = pd.read_csv(tmp_path / "classes.csv", keep_default_na=False)
    labels = get_dataset("digits", "train").labels
    expected = ["low" if label <= 2 else "high" if label >= 8 else "" for label in labels]
    assert list(table.group) == expected
    assert f"(none) {expected.count('')}" in printed
    assert "class 1 is in two groups, low and mid" in invoke(
        "groups", "--dataset", "digits", "--class-group", "low=0,1", "--class-group", "mid=1,2", "--out", tmp_path / "x.csv",
        exit_code=1).output
    assert "has no groups of its own" in invoke("groups", "--dataset", "digits", "--out", tmp_path / "y.csv",
                                                exit_code=1).output
    for bad in ("low", "low=", "low=0,x", "low=0,10"):
        assert f"Error: --class-group {bad}" in invoke("groups", "--dataset", "digits", "--class-group", bad,
                                                          "--out", tmp_path / "z.csv", exit_code=1).output
