"""Teachers judged on the data students validate on.

`kd`, `at` and `--kd-source best` learn from the one teacher that is best on the store's
data. A checkpoint's own validation figure was measured on whatever data that teacher was
trained on, so stage one runs every teacher over the data set's held-out validation split
(the one students validate on) and records its top-1 and mean confidence drop there in the
store. A data set without such a split (ImageNet: its val split is the test split) records
none, and a run that needs the best teacher asks for --teacher.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data import Geometry, SampleSet, UnreadableImage
from pipeline.errors import PipelineError
from pipeline.explain import Explanation
from pipeline.scoring import confidence_drop

if TYPE_CHECKING:
    from pipeline.store.teacher_store import TeacherStore


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


def named_or_best_teacher(store: "TeacherStore", teacher: str | None, method: str) -> str:
    """`teacher` if given, else the teacher with the best top-1 on this data's held-out split, measured at
    extraction (`judge`); without it for every teacher, the user names one."""
    if teacher is not None:
        store.teacher_group(teacher)  # fails listing the store's teachers
        return teacher
    attrs = {name: store.teacher_attrs(name) for name in store.teachers}
    judged = {name: judged_top1(a) for name, a in attrs.items()}
    lacking = sorted(name for name, figure in judged.items() if figure is None)
    if lacking:
        raise PipelineError(
            f"{method} needs one teacher, and {', '.join(lacking)} of store {store.location} has no top-1 measured on this "
            "data's held-out split (the data set has none besides its test split; a checkpoint's own figure of "
            f"other data does not count); name one with --teacher, one of: {', '.join(store.teachers)}"
            + ("; or take each sample's logits from the teachers it selects with --kd-source selected"
               if method == "--kd-source best" else ""))
    best = max(sorted(judged), key=lambda name: judged[name][0])
    print(f"{method}: logits from {best} ({judged[best][1]}; {checkpoint_note(attrs[best])}; best of {len(judged)} "
          "teachers)")
    return best
