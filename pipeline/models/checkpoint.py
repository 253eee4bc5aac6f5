"""Checkpoints that carry what is needed to rebuild the model and how it was made."""

import hashlib
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models import create_model


CHECKPOINT_KEYS = ("arch", "in_channels", "num_classes", "state_dict")  # what load_checkpoint needs


def weights_sha256(model: nn.Module) -> str:
    """A hash of the parameters and buffers themselves (stable across torch.save files)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model: nn.Module, record: dict) -> None:
    """`record` holds at least arch, in_channels, num_classes (and name: the arch where missing);
    add transform (mean/std, default: the data set's), config and metrics (val_top1: held out)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({**record, "state_dict": state}, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint under the real name


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the registered architecture, load the weights, return (model in eval mode, record)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} does not exist; train it first (pipeline train-teachers)")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        missing = [key for key in CHECKPOINT_KEYS if key not in record] if isinstance(record, dict) else None
        if missing:
            hint = (" (it looks like a plain state_dict: pass it as torchvision:<arch>:<path> or "
                    "timm:<name>:<path>)" if all(isinstance(v, torch.Tensor) for v in record.values()) else "")
            raise PipelineError(f"checkpoint {path} lacks {', '.join(missing)}; a checkpoint record holds "
                                f"{', '.join(CHECKPOINT_KEYS)}{hint}")
        model = create_model(record["arch"], record["in_channels"], record["num_classes"])
        model.load_state_dict(record.pop("state_dict"))
    except PipelineError:
        raise
    except Exception as error:  # a truncated file, a foreign pickle, a mismatched state dict
        reason = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else ""
        raise PipelineError(
            f"checkpoint {path} cannot be read ({type(error).__name__}: {reason}); "
            "pass a checkpoint written by `pipeline train-teachers`"
        ) from None
    return model.eval(), record
