"""Where models run, and what running there fast means (bf16 autocast, channels_last on CUDA)."""

from contextlib import nullcontext

import torch

from pipeline.errors import PipelineError


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; an unavailable cuda fails with the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PipelineError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device {name} asked for, but torch sees no CUDA GPU; pass --device cpu")
    return device


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return x
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def autocast(device: torch.device):
    """bf16 mixed precision on CUDA; full float32 on the CPU (where results must be exact)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
