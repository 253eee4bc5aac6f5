"""Stage two under torchrun: ranks read disjoint blocks, DDP averages explain-kd's gradients (the
student's Grad-CAM double backward included) as one process would, and a 2-process run trains."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from conftest import invoke
from pipeline.cache import TeacherStore
from pipeline.data import get_dataset
from pipeline.ddp import Ranks
from pipeline.distill import DistillationLoss
from pipeline.evaluation import top1
from pipeline.explain import CamLayer, probe_input
from pipeline.models import create_model
from pipeline.models.checkpoint import load_checkpoint
from pipeline.stream import BlockStream


@pytest.fixture(scope="module")
def small_store(teachers, tmp_path_factory):
    store = tmp_path_factory.mktemp("ddp") / "store.zarr"
    invoke("extract-teachers", "--split", "test", "--teachers", ",".join(map(str, teachers)), "--store", store,
           "--block-size", 32)
    return store


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
             "labels": torch.randint(0, 10, (size,))}
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
    loss_fn = DistillationLoss("explain-kd", ["t1", "t2"], layer, (0.3,), (0.32,), temperature=4.0, alpha=0.5,
                               beta=2.0, num_classes=10, student_map="gradcam")
    model = model_wrapper(student)  # held: a DDP wrapper reduces gradients while it lives
    loss_fn(model, batch)["loss"].backward()  # eval mode: batch norm is per sample
    return [p.grad.clone() for p in student.parameters()]


def ddp_rank(rank, arch, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    half = {key: value[rank * 2:(rank + 1) * 2] for key, value in explain_kd_batch().items()}
    grads = student_gradients(arch, lambda model: Ranks(rank, 2).wrap(model, torch.device("cpu")), half)
    torch.save(grads, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("arch", ["resnet8_slim", "vgg8_bn"])  # closed-form and autograd (double backward) maps
def test_ddp_averages_explain_kd_gradients_as_one_process_on_the_whole_batch(arch, tmp_path):
    mp.spawn(ddp_rank, args=(arch, tmp_path / "init", tmp_path / "grads"), nprocs=2)
    whole = student_gradients(arch, lambda model: model, explain_kd_batch())
    for rank in range(2):  # both ranks hold the average of their halves' gradients: the whole batch's
        for got, want in zip(torch.load(tmp_path / f"grads.{rank}"), whole, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


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
