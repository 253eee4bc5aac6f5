"""--compile: each full batch's terms captured as one graph (torch.compile, fullgraph), for each way a
method's terms are made (kd and aver share kd-avg's and ca-mkd's pieces). On the CPU the eager
backend runs the very operators of an uncaptured step, so every number must be the uncaptured one's; a
graph break anywhere in a method's step fails the capture (fullgraph) and these tests."""

import pytest
import torch

from conftest import distillation
from pipeline.augment import Augmentation
from pipeline.explain import CamLayer
from pipeline.models import create_model
from test_distill import PROBE, make_student_batch

CPU = torch.device("cpu")
ATTENTION = {"beta": 0.5, "student_map": "attention"}  # explain-kd's validated recipe
CAPTURED = [("ce", {}, None), ("kd-avg", {}, None), ("ca-mkd", {}, None), ("ebkd", {}, None), ("at", {"beta": 1.0}, None),
            ("explain-kd", ATTENTION, "per-sample"),
            ("explain-kd", {}, "weighted"), ("explain-kd", {}, "random-batch")]


@pytest.mark.parametrize("method, settings, policy", CAPTURED, ids=[f"{m}-{p}" for m, _, p in CAPTURED])
def test_a_captured_step_gives_the_uncaptured_terms_and_gradients(method, settings, policy):
    torch._dynamo.reset()
    batch, teachers = make_student_batch(method)
    terms_of = {}
    for captured in (False, True):
        torch.manual_seed(0)
        student = create_model("resnet8_slim", 1, 10).train()
        drawn = torch.tensor([1, 0]) if policy == "random-batch" else None  # each store row's drawn teacher
        loss_fn = distillation(method, teachers, CamLayer.of(student, PROBE), policy=policy or "per-sample",
                               drawn=drawn, augmentation=Augmentation(3, seed=5), **settings)
        if captured:
            loss_fn.capture(CPU, batch_size=2)
        terms = loss_fn(student, batch)
        sum(term.total * term.weight for term in terms.values()).backward()
        terms_of[captured] = {k: (t.total.detach(), t.count) for k, t in terms.items()}, \
            [p.grad.clone() for p in student.parameters()]
    (eager, eager_grads), (captured, captured_grads) = terms_of[False], terms_of[True]
    assert eager.keys() == captured.keys()
    for key in eager:
        assert torch.equal(eager[key][0], captured[key][0]) and torch.equal(eager[key][1], captured[key][1]), key
    assert all(torch.equal(a, b) for a, b in zip(eager_grads, captured_grads))


def test_a_partial_batch_runs_uncaptured():
    batch, teachers = make_student_batch("kd")
    student = create_model("resnet8_slim", 1, 10).train()
    loss_fn = distillation("kd", teachers, CamLayer.of(student, PROBE))
    calls = []
    loss_fn.capture(CPU, batch_size=4)
    loss_fn.captured = lambda *args: calls.append(args) or loss_fn.terms(*args)
    loss_fn(student, batch)  # 2 rows of 4
    assert calls == []
    loss_fn.full_batch = 2
    loss_fn(student, batch)
    assert len(calls) == 1


def test_a_double_backward_runs_uncaptured_and_torchrun_is_refused(capsys):
    from pipeline.ddp import Ranks
    from pipeline.errors import PipelineError
    from pipeline.methods import method_of
    from pipeline.student import capture_step
    from pipeline.student_config import TrainStudentConfig

    batch, teachers = make_student_batch("explain-kd")
    student = create_model("resnet8_slim", 1, 10).train()
    loss_fn = distillation("explain-kd", teachers, CamLayer.of(student, PROBE), beta=10.0)
    design = TrainStudentConfig(recipe="design", compile=True)
    capture_step(loss_fn, method_of("explain-kd"), design, CPU, Ranks())
    assert loss_fn.captured is None
    assert "differentiates the student's Grad-CAM (a double backward), which torch.compile does not capture; it " \
           "runs uncaptured" in capsys.readouterr().out
    validated = TrainStudentConfig(compile=True)
    capture_step(loss_fn, method_of("explain-kd"), validated, CPU, Ranks())
    assert loss_fn.captured is not None and loss_fn.full_batch == validated.batch_size
    with pytest.raises(PipelineError, match="--compile under torchrun is not built"):
        capture_step(loss_fn, method_of("explain-kd"), validated, CPU, Ranks(0, 2))
    with pytest.raises(PipelineError, match="--compile with --beta-warmup 3: the map weight changes every warm-up "
                                            "epoch, and the step would be captured again each time; drop one"):
        capture_step(loss_fn, method_of("explain-kd"), TrainStudentConfig(compile=True, beta_warmup=3), CPU, Ranks())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_captured_step_runs_in_cuda_graphs_near_the_uncaptured_one():
    """Inductor and CUDA graphs (mode reduce-overhead) over several steps, new moves each, a partial batch
    between: within bf16's rounding of the uncaptured step, and no part of the step kept off the graphs."""
    from torch._dynamo.utils import counters

    from pipeline.devices import autocast, prepare_model

    cuda = torch.device("cuda")
    torch._dynamo.reset()
    counters.clear()
    batch, teachers = make_student_batch("explain-kd")
    full = {key: torch.cat([value] * 4).to(cuda) for key, value in batch.items()}  # 8 rows
    partial = {key: value[:5] for key, value in full.items()}
    results = {}
    for captured in (False, True):
        torch.manual_seed(0)
        student = prepare_model(create_model("resnet8_slim", 1, 10), cuda).train()
        loss_fn = distillation("explain-kd", teachers, CamLayer.of(student.eval(), PROBE.to(cuda)), policy="random",
                               drawn=torch.tensor([1, 0] * 4), augmentation=Augmentation(3, seed=5, device=cuda),
                               **ATTENTION)
        loss_fn.policy.to(cuda)
        student.train()
        if captured:
            loss_fn.capture(cuda, batch_size=8)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
        losses = []
        for step_batch in (full, full, partial, full, full):
            with autocast(cuda):
                terms = loss_fn(student, step_batch)
            loss = sum(term.total * term.weight / term.count.clamp_min(1) for term in terms.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        results[captured] = losses
    torch.testing.assert_close(results[True], results[False], rtol=2e-2, atol=1e-3)
    assert counters["inductor"]["cudagraph_skips"] == 0
