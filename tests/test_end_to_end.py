"""Every CLI command through click's CliRunner on the digits data: train tiny teachers,
extract them into a store, delete their checkpoints, train students, evaluate."""

import json

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.data import DATASETS

TEACHERS = ("resnet8_slim", "vgg8_bn")  # one closed-form and one autograd Grad-CAM path, both fast


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    teachers, store = root / "teachers", root / "store.zarr"
    invoke("train-teachers", "--teachers", ",".join(TEACHERS), "--epochs", 3, "--out-dir", teachers)
    invoke("extract-teachers", "--teachers", ",".join(str(teachers / f"{t}.pt") for t in TEACHERS),
           "--store", store, "--block-size", 512)
    (root / "kept").mkdir()
    for checkpoint in teachers.glob("*.pt"):  # stage two must not need the teachers
        checkpoint.rename(root / "kept" / checkpoint.name)
    return root


def test_store_opens_with_plain_zarr_and_holds_every_artefact(run):
    group = zarr.open_group(run / "store.zarr", mode="r")
    assert group.attrs["dataset"]["name"] == "digits" and group.attrs["dataset"]["num_samples"] == 1149
    assert group.attrs["target"] == "label"
    assert group["labels"].shape == (1149,) and group["images"].shape == (1149, 32, 32, 1)
    assert sorted(group["teachers"].group_keys()) == sorted(TEACHERS)
    maps = {"resnet8_slim": (8, 8), "vgg8_bn": (4, 4)}
    for name in TEACHERS:
        teacher = group[f"teachers/{name}"]
        assert teacher["logits"].shape == (1149, 1, 10) and teacher["logits"].dtype == np.float16  # one view
        assert teacher["cam"].shape == (1149, 1, *maps[name]) and teacher["cam"].dtype == np.uint8
        assert teacher["progress"][:].all()
        y, o = teacher["y_prob"][:], teacher["o_prob"][:]
        assert np.isfinite(y).all() and np.isfinite(o).all() and (y > 0).all()
        assert teacher["cam"][:].max(axis=(2, 3)).max() == 255
        assert teacher.attrs["cam_path"] == ("autograd" if name == "vgg8_bn" else "closed-form")
        # the cached logits are the trained teacher's: far better than chance on the cached split
        accuracy = (teacher["logits"][:, 0].argmax(1) == group["labels"][:]).mean()
        assert accuracy > 0.3, accuracy  # chance: 0.1


@pytest.mark.parametrize("method", ["ce", "kd", "kd-avg", "explain-kd"])
def test_train_student_without_teacher_checkpoints(run, method):
    result = invoke("train-student", "--store", run / "store.zarr", "--method", method, "--epochs", 1,
                    "--out-dir", run / "students")
    history = (run / "students" / method / "history.csv").read_text().splitlines()
    assert len(history) == 2  # header + one epoch
    header = history[0].split(",")
    # by default no method has a map term (explain-kd's validated recipe: beta 0)
    assert "ce" in header and ("kd" in header) == (method != "ce") and "map" not in header
    if method == "explain-kd":
        assert {f"chosen/{t}" for t in TEACHERS} <= set(header)
    assert "epoch 1/1" in result.output


def test_evaluate_writes_metrics_for_students_and_teachers(run):
    for method in ("ce", "explain-kd"):
        if not (run / "students" / method / "checkpoint.pt").exists():
            invoke("train-student", "--store", run / "store.zarr", "--method", method, "--epochs", 1,
                   "--out-dir", run / "students")
    result = invoke("evaluate", "--students-dir", run / "students", "--teacher-metrics",
                    run / "teachers" / "metrics.json", "--out", run / "metrics.json")
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["teachers"]) == set(TEACHERS)
    assert {"ce", "explain-kd"} <= set(metrics["students"])
    for values in [*metrics["teachers"].values(), *metrics["students"].values()]:
        assert {"top1", "top5", "mean_confidence_drop", "increase_in_confidence", "params"} <= set(values)
        assert 0 <= values["top1"] <= values["top5"] <= 1
        assert 0 <= values["mean_confidence_drop"] <= 1
    assert "explain-kd" in result.output and "vgg8_bn" in result.output


def test_one_teacher_methods_choose_by_validation_accuracy_and_never_read_the_test_split(run, monkeypatch):
    load = DATASETS.get("digits")

    def guarded(split, **kwargs):
        assert split != "test", "train-student read the test split"
        return load(split, **kwargs)

    monkeypatch.setitem(DATASETS._entries, "digits", guarded)
    metrics = json.loads((run / "teachers" / "metrics.json").read_text())
    best = max(sorted(TEACHERS), key=lambda t: metrics[t]["val_top1"])  # recorded by train-teachers on val
    figure = f"{metrics[best]['val_top1']:.4f}"  # extraction measures the same figure on the same 288 images
    for args in (["--method", "kd"], ["--method", "at"], ["--method", "explain-kd", "--kd-source", "best"]):
        result = invoke("train-student", "--store", run / "store.zarr", "--epochs", 1, "--out-dir",
                        run / "students", "--run-name", "chosen", *args)
        assert f"logits from {best} (top-1 {figure} on the 288 held-out val images, measured at extraction; its " \
               f"checkpoint says {figure}, on the same images; best of 2 teachers)" in result.output
    named = invoke("train-student", "--store", run / "store.zarr", "--method", "kd", "--teacher", "vgg8_bn",
                   "--epochs", 1, "--out-dir", run / "students", "--run-name", "named")
    assert "logits from" not in named.output


def val_top1(checkpoint) -> float:
    """Top-1 over digits' validation split, counted here with a plain forward pass."""
    import torch

    from pipeline.data import get_dataset
    from pipeline.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    val = get_dataset("digits", "val")
    x = (torch.from_numpy(np.stack([val.image(i) for i in range(len(val))])).permute(0, 3, 1, 2).float() / 255 - 0.3) / 0.32
    with torch.no_grad():
        return float((model(x).argmax(1).numpy() == val.labels).mean())


def test_a_teacher_whose_checkpoint_figure_is_of_other_data_is_judged_on_this_data(run, tmp_path):
    """An impostor: the trained resnet8_slim with its classifier's rows turned by one class (it names the next
    digit: wrong on this data), whose checkpoint claims 0.99 on data of the same name from another folder."""
    import torch

    from pipeline.models.checkpoint import load_checkpoint, save_checkpoint

    model, record = load_checkpoint(run / "kept" / "resnet8_slim.pt")
    with torch.no_grad():
        model.fc.weight.copy_(model.fc.weight.roll(1, 0))
        model.fc.bias.copy_(model.fc.bias.roll(1, 0))
    save_checkpoint(tmp_path / "impostor.pt", model, {
        **record, "name": "impostor", "metrics": {"val_top1": 0.99},
        "val_dataset": {**record["val_dataset"], "ids_sha256": "f" * 64}})  # digits, but other images
    teachers = [tmp_path / "impostor.pt", run / "kept" / "vgg8_bn.pt"]
    measured = {"impostor": val_top1(teachers[0]), "vgg8_bn": val_top1(teachers[1])}
    assert measured["impostor"] < 0.2 < measured["vgg8_bn"]  # the premise: wrong here, the other one is not
    store = tmp_path / "test.zarr"
    result = invoke("extract-teachers", "--split", "test", "--teachers", ",".join(map(str, teachers)), "--store", store)
    for name in measured:
        assert f"teacher {name} on the 288 held-out val images: top-1 {measured[name]:.4f}" in result.output
    table = invoke("store", "info", store).output
    assert "heldout_top1" in table and f"{measured['impostor']:.4f}" in table
    result = invoke("train-student", "--split", "test", "--store", store, "--method", "kd", "--epochs", 1,
                    "--out-dir", tmp_path / "students")
    assert f"kd: logits from vgg8_bn (top-1 {measured['vgg8_bn']:.4f} on the 288 held-out val images, measured at " \
           "extraction; its checkpoint says" in result.output
    named = invoke("train-student", "--split", "test", "--store", store, "--method", "kd", "--epochs", 1, "--teacher",
                   "impostor", "--out-dir", tmp_path / "named")
    assert "logits from" not in named.output  # a named teacher is taken as named


def test_extracting_again_reuses_the_finished_store(run):
    store = zarr.open_group(run / "store.zarr", mode="r")
    before = store["teachers/vgg8_bn/logits"][:]
    result = CliRunner().invoke(main, ["extract-teachers", "--store", str(run / "store.zarr"),
                                       "--teachers", str(run / "teachers" / "vgg8_bn.pt")])
    assert result.exit_code == 1  # the checkpoint is gone ...
    assert "does not exist" in result.output
    np.testing.assert_array_equal(store["teachers/vgg8_bn/logits"][:], before)  # ... and the store is untouched
