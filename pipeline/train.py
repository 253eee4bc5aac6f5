"""The one training loop, used by teachers (cross-entropy) and students (distillation)."""

import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.ddp import Ranks
from pipeline.devices import autocast, prepare_model
from pipeline.errors import PipelineError
from pipeline.objective import Term, loss_of

POSTFIX_EVERY = 25  # steps between updates of the progress bar's loss
STATE_VERSION = 2  # of a saved training state; 2: each loss term's running count beside its total


class Resume:
    """Where a run saves its training state (the file `path`), so that a killed run continues exactly:
    model, optimizer and schedule, the epoch and step reached, the epoch's running sums, and the states
    of `generators` and torch's own generator. `every` > 0 also saves every that many steps. `config`
    identifies the run: state saved under another config is refused, never mixed in.

    Under torchrun every rank saves at the same step (a save is a collective): rank 0 writes one file
    with the shared state (DDP keeps the weights and the optimizer equal on all ranks) and each rank's
    own position, running sums and generators; on resume rank 0 reads it and hands each rank its
    part, so only rank 0 needs the run's folder."""

    def __init__(self, path: Path, config: dict, every: int = 0, generators: tuple[torch.Generator, ...] = (),
                 ranks: Ranks = Ranks()):
        self.path, self.config, self.every, self.generators = Path(path), config, every, generators
        self.ranks = ranks

    def save(self, state: dict) -> None:
        own = {"position": state["position"], "torch_rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
               "generators": [g.get_state() for g in self.generators]}
        per_rank = self.ranks.gather(own)
        if not self.ranks.main:
            return
        shared = {key: value for key, value in state.items() if key != "position"}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save({**shared, "version": STATE_VERSION, "config": self.config, "ranks": per_rank}, partial)
        os.replace(partial, self.path)  # a kill while saving leaves the previous state whole

    def load(self) -> dict | None:
        """This rank's view of the saved state, or None when there is none (`restore_generators` puts the
        generators back)."""
        state = self.ranks.agree(self.read)
        return state and {**state, **state["ranks"][self.ranks.rank]}

    def read(self) -> dict | None:
        if not self.path.is_file():
            print(f"no saved training state at {self.path}: the run starts from its beginning")
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)  # data only: no pickled code runs
        except Exception as error:
            raise PipelineError(f"cannot read the saved training state {self.path} ({type(error).__name__}); "
                                "delete it to start the run again") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise PipelineError(f"{self.path} was saved by an earlier version of this code (its state has no loss "
                                "term counts); delete it to start the run again")
        changed = sorted(k for k in set(self.config) | set(state["config"])
                         if self.config.get(k) != state["config"].get(k))
        if changed:
            k = changed[0]
            have, want = (str(c.get(k)) for c in (state["config"], self.config))
            shorten = lambda text: text if len(text) <= 60 else text[:57] + "..."  # noqa: E731
            raise PipelineError(f"{self.path} was saved by a run with {k}={shorten(have)}, not {shorten(want)}; "
                                "resume with the same settings, store and code, or delete it to start again")
        return state

    def restore_generators(self, state: dict) -> None:
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        for generator, saved in zip(self.generators, state["generators"], strict=True):
            generator.set_state(saved)

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class LrSchedule:
    """How the learning rate moves, step by step: `cosine` decay from lr to 0 over the run, or `step`: lr times
    `decay` at each of the epochs `milestones` (from epoch m + 1 on, counting from 1: the CRD and CA-MKD code's
    lr_decay_epochs)."""

    kind: str = "cosine"
    milestones: tuple[int, ...] = ()
    decay: float = 0.1

    def factor(self, steps_per_epoch: Callable[[int], int], epochs: int) -> Callable[[int], float]:
        """Step (from 0) -> the multiple of lr it takes."""
        if self.kind == "step":
            if any(not 1 <= m < epochs for m in self.milestones):
                raise ValueError(f"milestones {self.milestones} must lie in 1..{epochs - 1} for {epochs} epochs")
            starts = np.cumsum([0] + [steps_per_epoch(epoch) for epoch in range(epochs)])
            return lambda step: self.decay ** sum(int(starts[m]) <= step for m in self.milestones)
        total = max(1, int(sum(steps_per_epoch(epoch) for epoch in range(epochs))))
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def fit(
    model: nn.Module,
    batches: Callable[[int], Iterable[dict]],
    loss_fn: Callable[[nn.Module, dict], dict[str, Term]],
    *, epochs: int, steps_per_epoch: Callable[[int], int], lr: float, weight_decay: float, desc: str,
    schedule: LrSchedule = LrSchedule(), device: torch.device = torch.device("cpu"), resume: Resume | None = None,
    ranks: Ranks = Ranks(),
) -> list[dict]:
    """Train `model` and return one row per epoch with the mean of every loss term and the loss.

    `batches(epoch)` yields batch dicts; `loss_fn` returns the batch's loss terms (pipeline.objective):
    their weighted means are minimised, terms of weight 0 are only logged. `steps_per_epoch(epoch)` must
    be exactly the number of batches `batches(epoch)` yields: the learning rate follows `schedule` step by step
    (cosine reaches 0 after the last of them; a row's `lr` is that of its epoch's last step). The model and each batch are moved to
    `device`; the model is left there (on CUDA in channels_last, its losses computed under bf16 autocast).
    With `resume`, the state is saved at the end of every epoch (and every `resume.every` steps) and a saved
    state is continued from: `batches(epoch)` must yield the same batches again, so the steps already taken
    are skipped. Under torchrun (`ranks`), each rank's `batches` are its own share, `steps_per_epoch` the
    steps every rank takes, and every step's gradient is that of the mean over the rows of all ranks
    (pipeline.objective; a rank out of batches takes padding steps that count no row).
    """
    model = prepare_model(model, device)
    trained = ranks.wrap(model, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor(steps_per_epoch, epochs))
    history, start = [], {"epoch": 0, "step": 0, "sums": {}, "counts": {}}
    saved = resume.load() if resume else None
    if saved:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["schedule"])
        history, start = saved["history"], saved["position"]
        print(f"{desc}: resuming at epoch {start['epoch'] + 1}, step {start['step']} ({resume.path})")

    def save(epoch: int, step: int, sums: dict, counts: dict) -> None:
        floats = lambda values: {k: float(v) for k, v in values.items()}  # noqa: E731
        resume.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "schedule": scheduler.state_dict(), "history": history,
                     "position": {"epoch": epoch, "step": step, "sums": floats(sums), "counts": floats(counts)}})

    for epoch in range(start["epoch"], epochs):
        model.train()
        resumed = saved is not None and epoch == start["epoch"]
        # each term's running total and count over the epoch (kept on the device: no wait for the GPU per step)
        sums = defaultdict(float, start["sums"] if resumed else {})
        counts = defaultdict(float, start["counts"] if resumed else {})
        skip = start["step"] if resumed else 0
        last_lr, weights = optimizer.param_groups[0]["lr"], {}
        # generators as they were when the state was saved: before this epoch's loader drew its seeds
        # (a state saved at an epoch's end), or after (one saved within the epoch)
        if resumed and skip == 0:
            resume.restore_generators(saved)
        epoch_batches = iter(batches(epoch))
        if resumed and skip > 0:
            resume.restore_generators(saved)
        progress = tqdm(padded(epoch_batches, steps_per_epoch(epoch), ranks.world > 1), total=steps_per_epoch(epoch),
                        desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False, disable=None if ranks.main else True)
        for step, (batch, real) in enumerate(progress, 1):
            if step <= skip:  # taken before the run was stopped
                continue
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            model.train(real)  # a padding step moves no batch-norm statistics
            with autocast(device):
                terms = loss_fn(trained, batch)
            if not real:  # a padding step counts no row: its gradient is zero
                terms = {key: term.scaled(0.0) for key, term in terms.items()}
            step_counts = ranks.all_sum(torch.stack([term.count.float() for term in terms.values()]))
            optimizer.zero_grad(set_to_none=True)
            (loss_of(terms, step_counts) * ranks.world).backward()  # DDP averages: the mean over every rank's rows
            last_lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            for key, term in terms.items():
                sums[key] = sums[key] + term.total.detach().double()
                counts[key] = counts[key] + term.count.detach().double()
                weights[key] = term.weight
            if real and step % POSTFIX_EVERY == 1:  # reading a loss waits for the GPU
                progress.set_postfix(loss=f"{float(loss_of(terms).detach()):.3f}")
            if resume and resume.every and step % resume.every == 0 and step < steps_per_epoch(epoch):
                save(epoch, step, sums, counts)
        keys = sorted(sums)
        totals = ranks.sum([float(sums[key]) for key in keys] + [float(counts[key]) for key in keys], device)
        means = {key: total / max(count, 1) for key, total, count in zip(keys, totals, totals[len(keys):])}
        row = {"epoch": epoch + 1, **means, "loss": sum(weights[key] * means[key] for key in keys), "lr": last_lr}
        history.append(row)
        if ranks.main:
            print(f"{desc} epoch {epoch + 1}/{epochs}: " + " ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
        if resume:
            save(epoch + 1, 0, {}, {})
    return history


def padded(batches: Iterable[dict], steps: int, pad: bool) -> Iterable[tuple[dict, bool]]:
    """(batch, True) for each batch, then with `pad` (the last batch, False) until `steps`: the zero-loss
    steps of a rank with fewer batches than another (pipeline.ddp). Without `pad`, the batches must be
    exactly `steps` (the schedule was planned for them)."""
    last, taken = None, 0
    for last in batches:
        taken += 1
        yield last, True
    if taken != steps and not (pad and 0 < taken < steps):
        raise PipelineError(f"the epoch yielded {taken} batches where {steps} were planned; report this bug")
    for _ in range(steps - taken):
        yield last, False


def seeded_generator(seed: int, epoch: int = 0) -> torch.Generator:
    """A generator whose stream depends only on (seed, epoch): reruns shuffle identically."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)
