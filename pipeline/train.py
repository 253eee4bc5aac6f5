"""The one training loop, used by teachers (cross-entropy) and students (distillation)."""

import math
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm


def fit(
    model: nn.Module,
    batches: Callable[[int], Iterable[dict]],
    loss_fn: Callable[[nn.Module, dict], dict[str, torch.Tensor]],
    *, epochs: int, steps_per_epoch: Callable[[int], int], lr: float, weight_decay: float, desc: str,
    device: torch.device = torch.device("cpu"),
) -> list[dict]:
    """Train `model` and return one row per epoch with the mean of every loss component.

    `batches(epoch)` yields batch dicts; `loss_fn` returns a dict whose "loss" entry is
    minimised and whose other entries (components, per-teacher terms) are only logged.
    `steps_per_epoch(epoch)` must be exactly the number of batches `batches(epoch)` yields: the
    cosine schedule reaches 0 after the last of them (a row's `lr` is that of its epoch's last step).
    The model and each batch are moved to `device`; the model is left there.
    """
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    total_steps = max(1, sum(steps_per_epoch(epoch) for epoch in range(epochs)))
    schedule = torch.optim.lr_scheduler.LambdaLR(  # cosine decay from lr to 0, per step
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    history = []
    for epoch in range(epochs):
        model.train()
        sums, seen, last_lr = defaultdict(float), 0, optimizer.param_groups[0]["lr"]
        progress = tqdm(batches(epoch), total=steps_per_epoch(epoch), desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False, disable=None)
        for batch in progress:
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            losses = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            last_lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            schedule.step()
            n = len(batch["labels"])
            for key, value in losses.items():
                sums[key] += float(value.detach()) * n
            seen += n
            progress.set_postfix(loss=f"{float(losses['loss'].detach()):.3f}")
        row = {"epoch": epoch + 1, **{key: total / max(seen, 1) for key, total in sums.items()}, "lr": last_lr}
        history.append(row)
        print(f"{desc} epoch {epoch + 1}/{epochs}: " + " ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
    return history


def seeded_generator(seed: int, epoch: int = 0) -> torch.Generator:
    """A generator whose stream depends only on (seed, epoch): reruns shuffle identically."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)
