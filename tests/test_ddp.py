"""Stage two under torchrun: ranks read disjoint blocks, DDP averages explain-kd's gradients (the
student's Grad-CAM double backward included) as one process would, and a 2-process run trains."""

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from conftest import Killed, distillation, extract_args, invoke, save_then_die
from pipeline.data import get_dataset
from pipeline.ddp import Ranks
from pipeline.errors import PipelineError
from pipeline.evaluation import top1
from pipeline.fabricate import free_port
from pipeline.explain import CamLayer, probe_input
from pipeline.models import create_model
from pipeline.models.checkpoint import load_checkpoint
from pipeline.objective import loss_of
from pipeline.store.teacher_store import TeacherStore
from pipeline.stream import BlockStream
from pipeline.student import train_student as train
from pipeline.student_config import TrainStudentConfig
from pipeline.train import Resume


def spawn(fn, args, nprocs):
    """`mp.spawn`, but the processes come from the forkserver, which has imported torch and the library once
    (conftest's preload), instead of each importing them anew; each is still a process of its own."""
    mp.start_processes(fn, args=args, nprocs=nprocs, start_method="forkserver")


@pytest.fixture(scope="module")
def small_store(digits_test_store):
    return digits_test_store  # conftest's extraction of the test split


def test_ranks_read_disjoint_blocks_that_cover_the_store_once_an_epoch(small_store):
    store = TeacherStore.open(small_store)
    blocks = list(range(store.num_blocks))
    for workers in (1, 2):
        streams = [BlockStream(str(small_store), ["labels"], blocks, batch_size=10, seed=3, workers=workers,
                               rank=rank, ranks=3) for rank in range(3)]
        for epoch in range(2):
            seen = []
            for stream in streams:
                stream.set_epoch(epoch)
                batches = [b["index"] for worker in range(workers) for b in worker_batches(stream, worker)]
                assert len(batches) == stream.num_batches(epoch, stream.rank)
                seen += torch.cat(batches).tolist()
            assert sorted(seen) == list(range(store.num_samples))  # every row once, over all ranks
            assert streams[0].steps(epoch) == max(s.num_batches(epoch) for s in streams)


def worker_batches(stream, worker):
    """What DataLoader worker `worker` of the stream yields (the worker info faked, no processes)."""
    from unittest import mock

    info = mock.Mock(id=worker, num_workers=stream.workers)
    with mock.patch("torch.utils.data.get_worker_info", return_value=info):
        return list(iter(stream))


def explain_kd_batch(size=4):
    torch.manual_seed(0)
    batch = {"images": torch.randint(0, 256, (size, 32, 32, 1), dtype=torch.uint8),
             "labels": torch.randint(0, 10, (size,)), "index": torch.arange(size)}
    for name in ("t1", "t2"):
        batch[f"teachers/{name}/logits"] = torch.randn(size, 10).half()
        batch[f"teachers/{name}/y_prob"] = torch.rand(size)
        batch[f"teachers/{name}/o_prob"] = torch.rand(size)
        batch[f"teachers/{name}/cam"] = torch.randint(1, 256, (size, 4, 4), dtype=torch.uint8)
        batch[f"teachers/{name}/cam_max"] = torch.rand(size) + 0.5  # every map counts
    return batch


def student_gradients(arch, model_wrapper, batch, device="cpu"):
    torch.manual_seed(1)
    student = create_model(arch, 1, 10).to(device)
    batch = {key: value.to(device) for key, value in batch.items()}
    layer = CamLayer.of(student.eval(), probe_input((32, 32, 1)).to(device))
    loss_fn = distillation("explain-kd", ["t1", "t2"], layer, alpha=0.5, beta=2.0, student_map="gradcam")
    model = model_wrapper(student)  # held: a DDP wrapper reduces gradients while it lives
    loss_of(loss_fn(model, batch)).backward()  # eval mode: batch norm is per sample
    return [p.grad.clone() for p in student.parameters()]


def ddp_rank(rank, arch, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    half = {key: value[rank * 2:(rank + 1) * 2] for key, value in explain_kd_batch().items()}
    grads = student_gradients(arch, lambda model: Ranks(rank, 2).wrap(model, torch.device("cpu")), half)
    torch.save(grads, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("arch", ["resnet8_slim", "vgg8_bn"])  # closed-form and autograd (double backward) maps
def test_ddp_averages_explain_kd_gradients_as_one_process_on_the_whole_batch(arch, tmp_path):
    spawn(ddp_rank, args=(arch, tmp_path / "init", tmp_path / "grads"), nprocs=2)
    whole = student_gradients(arch, lambda model: model, explain_kd_batch())
    for rank in range(2):  # both ranks hold the average of their halves' gradients: the whole batch's
        for got, want in zip(torch.load(tmp_path / f"grads.{rank}"), whole, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def agreeing_rank(rank, init_file, out):
    """What each of 2 ranks gets from Ranks.agree and Ranks.first."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ranks, said = Ranks(rank, 2), {}
    said["agree"] = ranks.agree(lambda: f"rank {rank}'s blocks")
    try:
        ranks.agree(lambda: (_ for _ in ()).throw(PipelineError(f"rank {rank} found no finished block")))
    except PipelineError as error:
        said["agree error"] = str(error)

    def download():  # rank 0 is slow: the others must wait for it, not download beside it
        if rank == 0:
            time.sleep(0.5)
        with open(out / "order", "a") as order:
            order.write(f"{rank}\n")
        return rank

    said["first"] = ranks.first(download)
    torch.save(said, out / f"said.{rank}")
    dist.destroy_process_group()


def test_rank_zero_decides_and_goes_first(tmp_path):
    spawn(agreeing_rank, args=(tmp_path / "init", tmp_path), nprocs=2)
    for rank in range(2):
        assert torch.load(tmp_path / f"said.{rank}") == {
            "agree": "rank 0's blocks", "agree error": "rank 0 found no finished block", "first": rank}
    assert (tmp_path / "order").read_text() == "0\n1\n"


def become_rank(rank, world, port):
    """This spawned process as torchrun would start rank `rank` of `world` (one thread each)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def erring_rank(rank, port, store, out):
    become_rank(rank, 3, port)
    try:
        train(TrainStudentConfig(split="test", store=str(store), epochs=1, out_dir=str(out), device="cpu"))
    except PipelineError as error:
        (out / f"error.{rank}").write_text(str(error))


def test_more_ranks_than_blocks_stop_every_rank_before_training(teachers, tmp_path):
    store = tmp_path / "two-blocks.zarr"
    invoke(*extract_args(teachers, store, "--split", "test", block_size=256))  # 360 samples: 2 blocks for 3 ranks
    spawn(erring_rank, args=(free_port(), store, tmp_path), nprocs=3)
    for rank in range(3):  # all stop alike (a rank left out would hang the others' first all-reduce)
        assert (tmp_path / f"error.{rank}").read_text() == (
            "rank 2 of 3 would get no batch in some epoch (2 blocks hold readable images); start fewer ranks, or "
            "extract with a smaller --block-size")
    assert not (tmp_path / "explain-kd").exists()


def resumable_rank(rank, port, store, out, kill_at_save, resume):
    """Rank `rank` of 2 training explain-kd with --save-every 4; killed at save `kill_at_save` (0: never)."""
    become_rank(rank, 2, port)
    Resume.save = save_then_die(kill_at_save, [])
    try:
        train(TrainStudentConfig(split="test", store=str(store), method="explain-kd", epochs=2, batch_size=16, shift=2,
                                 out_dir=str(out), save_every=4, resume=resume, device="cpu"))
    except Killed:
        dist.destroy_process_group()


def test_a_killed_two_rank_run_resumes_to_the_weights_of_an_uninterrupted_one(small_store, tmp_path):
    """Each rank's own position, loss sums and generators (its augmentation moves differ) come back."""
    spawn(resumable_rank, args=(free_port(), small_store, tmp_path / "whole", 0, False), nprocs=2)
    spawn(resumable_rank, args=(free_port(), small_store, tmp_path / "split", 2, False), nprocs=2)
    run = tmp_path / "split" / "explain-kd"
    assert sorted(p.name for p in run.iterdir()) == ["resume.pt"]  # killed at step 8 of epoch 1
    saved = torch.load(run / "resume.pt", weights_only=True)
    assert [part["position"]["step"] for part in saved["ranks"]] == [8, 8]
    assert not torch.equal(*(part["generators"][0] for part in saved["ranks"]))  # the ranks' own
    refused = invoke("train-student", "--split", "test", "--store", small_store, "--method", "explain-kd", "--epochs",
                     2, "--batch-size", 16, "--shift", 2, "--out-dir", tmp_path / "split", "--save-every", 4,
                     "--resume", "--device", "cpu", exit_code=1)
    assert "was saved by a run with ranks=2, not 1; resume with the same settings" in refused.output
    spawn(resumable_rank, args=(free_port(), small_store, tmp_path / "split", 0, True), nprocs=2)
    whole = load_checkpoint(tmp_path / "whole" / "explain-kd" / "checkpoint.pt")[0].state_dict()
    split = load_checkpoint(run / "checkpoint.pt")[0].state_dict()
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    assert (run / "history.csv").read_text() == (tmp_path / "whole" / "explain-kd" / "history.csv").read_text()
    assert not (run / "resume.pt").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("arch", ["resnet8_slim", "vgg8_bn"])
def test_ddp_over_nccl_takes_explain_kd_gradients_on_cuda(arch, tmp_path):
    """The CUDA path: one nccl rank's DDP-wrapped student (its Grad-CAM double backward included)
    gets the gradients the bare student gets, as `Ranks.wrap` wraps it on CUDA (several ranks need several
    GPUs)."""
    device = torch.device("cuda", 0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        wrapped = student_gradients(arch, lambda model: DistributedDataParallel(model, device_ids=[0]), explain_kd_batch(), device)
    finally:
        dist.destroy_process_group()
    for got, want in zip(wrapped, student_gradients(arch, lambda model: model, explain_kd_batch(), device), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_torchrun_with_two_processes_trains_a_student_within_noise_of_one(teachers, tmp_path):
    store = tmp_path / "train.zarr"
    invoke("extract-teachers", "--teachers", ",".join(map(str, teachers)), "--store", store, "--block-size", 64)
    args = ["train-student", "--store", store, "--method", "explain-kd", "--epochs", 3, "--device", "cpu"]
    invoke(*args, "--out-dir", tmp_path / "one", "--batch-size", 64)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --batch-size is per rank: two ranks of 32 take one process's 64-sample steps
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "pipeline", *map(str, args), "--batch-size", "32", "--out-dir", str(tmp_path / "two")],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "two" / "explain-kd"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "history.csv"]  # rank 0's, no state left
    assert result.stdout.count("student explain-kd epoch 3/3:") == 1  # printed by rank 0 alone
    test = get_dataset("digits", "test")
    accuracy = {name: top1(load_checkpoint(tmp_path / name / "explain-kd" / "checkpoint.pt")[0], test)
                for name in ("one", "two")}
    assert min(accuracy.values()) > 0.4, accuracy  # both learned (10 classes: chance is 0.1; 0.73 measured)
    # the same steps on the same samples, batch norm per rank: within noise of one process (0.73 both measured)
    assert abs(accuracy["one"] - accuracy["two"]) < 0.1, accuracy


# -- one optimizer step under torchrun equals one process on the union of the ranks' rows ---------------

TEACHERS = ("t1", "t2")


def no_norm_student() -> torch.nn.Module:
    """A GAP + Linear student without batch norm (whose statistics are per rank under DDP)."""
    from pipeline.models.small import GapLinearNet

    torch.manual_seed(5)
    features = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(6, 8, 3, stride=2, padding=1), torch.nn.ReLU())
    return GapLinearNet(features, 8, 10)


def rows(first: int, count: int, empty_maps: set[int] = frozenset()) -> dict:
    """Store-like rows `first`..`first + count - 1` for explain-kd; rows in `empty_maps` have no teacher map."""
    g = torch.Generator().manual_seed(first)
    batch = {"images": torch.randint(0, 256, (count, 16, 16, 1), dtype=torch.uint8, generator=g),
             "labels": torch.randint(0, 10, (count,), generator=g), "index": torch.arange(first, first + count)}
    empty = torch.tensor([r in empty_maps for r in range(first, first + count)])
    for name in TEACHERS:
        batch[f"teachers/{name}/logits"] = (3 * torch.randn(count, 10, generator=g)).half()
        batch[f"teachers/{name}/y_prob"] = torch.rand(count, generator=g) * 0.9 + 0.1
        batch[f"teachers/{name}/o_prob"] = torch.rand(count, generator=g)
        batch[f"teachers/{name}/cam"] = torch.randint(1, 256, (count, 4, 4), dtype=torch.uint8, generator=g)
        batch[f"teachers/{name}/cam_max"] = torch.where(empty, 0.0, torch.rand(count, generator=g) + 0.5)
    return batch


# per rank, the batches its blocks give: blocks of unequal size end in partial batches, so the ranks hold
# different row counts in a step and some ranks run out of batches first (their padding steps); rows 3, 4
# and 20-22 have empty teacher maps (rank 1's whole first batch of the 3-rank plan has none)
PLANS = {
    2: [[rows(0, 5, {3, 4}), rows(5, 3)], [rows(10, 2)]],
    3: [[rows(0, 5, {3}), rows(5, 5), rows(10, 1)], [rows(20, 3, {20, 21, 22}), rows(23, 4)], [rows(30, 4)]],
}


def union(plan: list[list[dict]], step: int) -> dict:
    """The rows all ranks hold in `step`, as one batch."""
    held = [batches[step] for batches in plan if step < len(batches)]
    return {key: torch.cat([b[key] for b in held]) for key in held[0]}


def fit_gradients(batches: list[dict], steps: int, ranks: Ranks) -> list[list[torch.Tensor]]:
    """Each optimizer step's gradients when `fit` trains explain-kd (Grad-CAM map term included) on `batches`."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from pipeline.train import fit

    student = no_norm_student()
    layer = CamLayer.of(student.eval(), probe_input((16, 16, 1)))
    loss_fn = distillation("explain-kd", list(TEACHERS), layer, alpha=0.7, beta=2.0, student_map="gradcam")
    seen = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append([p.grad.clone() for p in optimizer.param_groups[0]["params"]]))
    try:
        fit(student, lambda epoch: iter(batches), loss_fn, epochs=1, steps_per_epoch=lambda epoch: steps, lr=0.1,
            weight_decay=5e-4, desc="step", ranks=ranks)
    finally:
        hook.remove()
    return seen


def stepping_rank(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    plan = PLANS[world]
    torch.save(fit_gradients(plan[rank], max(map(len, plan)), Ranks(rank, world)), out / f"grads.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_step_gradients_equal_a_single_process_on_the_union_of_the_ranks_rows(world, tmp_path):
    """Every step's gradient is that of the mean loss over all rows the ranks hold in it (CE and KD over rows,
    the map term over the rows whose teacher map counts), however many each rank holds, padding steps included."""
    spawn(stepping_rank, args=(world, tmp_path / "init", tmp_path), nprocs=world)
    plan = PLANS[world]
    steps = max(map(len, plan))
    expected = fit_gradients([union(plan, step) for step in range(steps)], steps, Ranks())
    assert len(expected) == steps
    for rank in range(world):
        got = torch.load(tmp_path / f"grads.{rank}")
        assert len(got) == steps  # padding ranks step in lockstep
        for step, (have, want) in enumerate(zip(got, expected, strict=True)):
            for g, w in zip(have, want, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"rank {rank} step {step}: {m}")
