"""Teachers judged on the data students validate on.

`kd`, `at` and `--kd-source best` learn from the one teacher that is best on the store's
data. A checkpoint's own validation figure was measured on whatever data that teacher was
trained on, so stage one runs every teacher over the data set's held-out validation split
(the one students validate on) and records its top-1 and mean confidence drop there in the
store. A data set without such a split (ImageNet: its val split is the test split) records
none, and a run that needs the best teacher asks for --teacher.
"""

from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data import Geometry, SampleSet, UnreadableImage
from pipeline.errors import PipelineError
from pipeline.explain import Explanation
from pipeline.scoring import confidence_drop


def judge(name: str, outputs: Callable[[torch.Tensor, torch.Tensor], Explanation], val: SampleSet,
          geometry: Geometry | None, batch_size: int, skip_corrupt: bool = False) -> dict:
    """Teacher `name`'s top-1 and mean confidence drop over `val`'s readable images, seen at its input `geometry`
    (the eval transform, as students are validated); `outputs(images, labels)` runs it on a uint8 batch."""
    correct, drops, seen = 0, 0.0, 0
    for start in tqdm(range(0, len(val), batch_size), desc=f"judge {name} on {val.split}", unit="batch", leave=False):
        rows, images = [], []
        for i in range(start, min(start + batch_size, len(val))):
            try:
                images.append(val.image(i, geometry))
                rows.append(i)
            except UnreadableImage as error:
                if not skip_corrupt:
                    raise PipelineError(f"{error} (held-out split, where teachers are judged); pass --skip-corrupt "
                                        "to judge them without it") from None
        if not rows:
            continue
        labels = torch.as_tensor(val.labels[rows])
        result = outputs(torch.from_numpy(np.stack(images)), labels)
        correct += int((result.logits.argmax(1).cpu() == labels).sum())
        drops += float(confidence_drop(result.y_prob.float(), result.o_prob.float()).sum())
        seen += len(rows)
    if not seen:
        raise PipelineError(f"no image of {val.info.name}/{val.split} is readable to judge teacher {name} on")
    return {"split": val.split, "samples": seen, "top1": correct / seen, "mean_drop": drops / seen}


def judged_top1(attrs: dict) -> tuple[float, str] | None:
    """A store teacher's top-1 on this data's held-out split, measured at extraction, and how to say it; None
    where the data set has no such split (a checkpoint's own figure is shown, never chosen by)."""
    heldout = attrs.get("heldout")
    if not heldout:
        return None
    return heldout["top1"], f"top-1 {heldout['top1']:.4f} on the {heldout['samples']} held-out {heldout['split']} " \
                            "images, measured at extraction"


def checkpoint_note(attrs: dict) -> str:
    """What the teacher's checkpoint itself says, for the log beside the figure chosen by."""
    own, data = attrs.get("checkpoint_val_top1"), attrs.get("checkpoint_val_data")
    if own is None:
        return "its checkpoint has no validation figure"
    where = {"same": "on the same images", "other": "on other data"}.get(data, "on data it does not record")
    return f"its checkpoint says {own:.4f}, {where}"
