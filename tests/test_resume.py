"""Long student runs survive: a killed run resumed from its saved state ends with the weights of an
uninterrupted one (on the CPU, bit for bit)."""

import shutil

import pytest
import torch
import zarr

from conftest import Killed, extract_args, invoke, save_then_die
from pipeline.errors import PipelineError
from pipeline.train import Resume


@pytest.fixture(scope="module")
def store(teachers, tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "views.zarr"
    invoke(*extract_args(teachers, path, "--split", "test", "--views", 2, "--view-shift", 2, block_size=128))
    return path


def student(store, out, *extra, exit_code=0):
    return invoke("train-student", "--split", "test", "--store", store, "--method", "explain-kd", "--epochs", 2,
                  "--batch-size", 32, "--shift", 2, "--out-dir", out, *extra, exit_code=exit_code)


@pytest.fixture(scope="module")
def whole(store, tmp_path_factory):
    """The uninterrupted run each killed and resumed one must end as (the same command for every case)."""
    out = tmp_path_factory.mktemp("whole")
    student(store, out)
    return out


def weights(out):
    return torch.load(out / "explain-kd" / "checkpoint.pt", weights_only=True)["state_dict"]


@pytest.mark.parametrize("save_every,kill_at_save", [(0, 1), (3, 3)])  # after epoch 1; within epoch 1 (step 9)
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(store, whole, tmp_path, monkeypatch, save_every,
                                                                    kill_at_save):
    original, saves = Resume.save, []
    monkeypatch.setattr(Resume, "save", save_then_die(kill_at_save, saves))
    with pytest.raises(Killed):
        student(store, tmp_path / "split", "--save-every", save_every)
    monkeypatch.setattr(Resume, "save", original)
    assert not (tmp_path / "split" / "explain-kd" / "checkpoint.pt").exists()
    killed_at = saves[-1]
    assert (killed_at["epoch"], killed_at["step"]) == ((1, 0) if save_every == 0 else (0, 9))
    resumed = student(store, tmp_path / "split", "--save-every", save_every, "--resume")
    assert f"resuming at epoch {killed_at['epoch'] + 1}, step {killed_at['step']}" in resumed.output
    uninterrupted, split = weights(whole), weights(tmp_path / "split")
    assert uninterrupted.keys() == split.keys()
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], split[key]), key
    assert not (tmp_path / "split" / "explain-kd" / "resume.pt").exists()  # finished: nothing left to resume
    history = lambda out: (out / "explain-kd" / "history.csv").read_text()  # noqa: E731
    assert history(whole) == history(tmp_path / "split")


def test_a_captured_run_ends_with_the_uncaptured_runs_weights(store, whole, tmp_path):
    """--compile on the CPU: every full batch's step traced as one graph and run by the eager backend, the
    window's partial batches uncaptured; the same weights, bit for bit."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    student(store, tmp_path / "captured", "--compile")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step was captured
    uninterrupted, captured = weights(whole), weights(tmp_path / "captured")
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], captured[key]), key


def test_a_state_saved_under_other_settings_is_refused(store, tmp_path, monkeypatch):
    def die(self, state):
        raise Killed

    original = Resume.save
    monkeypatch.setattr(Resume, "save", lambda self, state: (original(self, state), die(self, state)))
    with pytest.raises(Killed):
        student(store, tmp_path)
    monkeypatch.setattr(Resume, "save", original)
    result = student(store, tmp_path, "--lr", 0.1, "--resume", exit_code=1)
    assert f"{tmp_path / 'explain-kd' / 'resume.pt'} was saved by a run with lr=0.05, not 0.1; resume with the " \
           "same settings, store and code, or delete it to start again" in result.output
    # the same settings on a store that has changed since (here: a block no longer finished)
    changed = tmp_path / "changed.zarr"
    shutil.copytree(store, changed)
    shutil.copy(tmp_path / "explain-kd" / "resume.pt", tmp_path / "saved.pt")
    for teacher in zarr.open_group(changed, mode="r")["teachers"].group_keys():
        zarr.open_group(changed, mode="r+")[f"teachers/{teacher}/progress"][1] = False
    result = student(changed, tmp_path, "--resume", "--allow-partial", exit_code=1)
    assert "was saved by a run with allow_partial=False, not True" in result.output
    with pytest.raises(Killed):  # a state saved with --allow-partial on the whole store ...
        monkeypatch.setattr(Resume, "save", lambda self, state: (original(self, state), die(self, state)))
        student(store, tmp_path, "--allow-partial")
    monkeypatch.setattr(Resume, "save", original)
    result = student(changed, tmp_path, "--resume", "--allow-partial", exit_code=1)  # ... is not resumed on a part
    assert "was saved by a run with blocks=[0, 1, 2], not [0, 2]" in result.output


def test_a_state_of_an_earlier_version_is_refused_in_one_line(tmp_path):
    torch.save({"config": {}, "model": {}, "position": {"epoch": 1, "step": 0, "sums": {}, "seen": 0}},
               tmp_path / "resume.pt")  # one process's state, as versions before torchrun's wrote it
    with pytest.raises(PipelineError, match="was saved by an earlier version of this code .* delete it"):
        Resume(tmp_path / "resume.pt", {}).load()


class Payload:
    """A pickle that runs code when it is read back (here: creates a file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_state_holding_code_is_refused_without_running_it(tmp_path):
    torch.save({"version": 2, "config": {}, "hook": Payload(tmp_path / "ran")}, tmp_path / "resume.pt")
    with pytest.raises(PipelineError, match="cannot read the saved training state .* delete it"):
        Resume(tmp_path / "resume.pt", {}).load()
    assert not (tmp_path / "ran").exists()
