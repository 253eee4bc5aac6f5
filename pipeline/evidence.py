"""What a selection policy weighs, for a batch of store rows: one type, built from a training batch
(pipeline.distill.Step) or from a store block (`store_evidence`: policies fitting store-wide statistics,
and `pipeline store selection`), so that one policy code serves both. On the eval view a policy chooses in
training as in the report; a K-view store's other views carry their own Y and O (store-wide statistics are
those of the eval view), and `random-batch` draws per batch, which the report takes to be a block.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.store.codec import dequantize_cam, full_logits
from pipeline.store.layout import teacher_array


@dataclass
class Evidence:
    """B rows of M teachers: each teacher's confidence in the explained class on the image (`y`) and on its
    explanation-masked image (`o`), whether it classifies the row `correct`ly, the rows' store indices
    (`rows`), and `maps()`: each teacher's cached Grad-CAM map, (B, h_m, w_m) floats, read only when called."""

    y: torch.Tensor
    o: torch.Tensor
    correct: torch.Tensor
    rows: torch.Tensor
    maps: Callable[[], list[torch.Tensor]]

    @classmethod
    def of(cls, values: dict, teachers: list[str], labels: torch.Tensor, rows: torch.Tensor, num_classes: int,
           logits: torch.Tensor | None = None) -> "Evidence":
        """From `values`, a dict of store arrays (array path -> rows) holding the teachers' logits and scores;
        `logits` (B, M, C), where the caller has them already."""
        if logits is None:
            logits = torch.stack([full_logits(values, t, num_classes) for t in teachers], 1)

        def field(key):
            return torch.stack([torch.as_tensor(values[teacher_array(t, key)]) for t in teachers], 1)

        return cls(field("y_prob").float(), field("o_prob").float(), logits.argmax(2) == labels[:, None].to(logits.device),
                   rows, lambda: [dequantize_cam(values[teacher_array(t, "cam")], values[teacher_array(t, "cam_max")])
                                  for t in teachers])

    def of_teachers(self, chosen: list[int]) -> "Evidence":
        """The evidence of the teachers at indices `chosen` only."""
        return Evidence(self.y[:, chosen], self.o[:, chosen], self.correct[:, chosen], self.rows,
                        lambda: [self.maps()[m] for m in chosen])



def store_evidence(store, teachers: list[str], maps: bool = False, blocks: list[int] | None = None) -> Iterator[Evidence]:
    """Per block of `blocks` (default: those every one of `teachers` finished): the evidence of its readable rows
    in the eval view (view 0); with `maps`, their maps are read too."""
    classes = store.attrs["dataset"]["num_classes"]
    fields = ["labels", "valid"] + [teacher_array(t, f) for t in teachers
                                    for f in (*store.logit_fields, "y_prob", "o_prob", *(("cam", "cam_max") if maps else ()))]
    for block in (store.finished_blocks(teachers) if blocks is None else blocks) if teachers else []:
        start, stop = store.block_rows(block)
        values = store.read_rows(start, stop, fields)
        valid = values["valid"]
        values = {key: value[valid] for key, value in values.items()}
        labels = torch.from_numpy(values["labels"].astype(np.int64))
        yield Evidence.of(values, teachers, labels, torch.arange(start, stop)[torch.from_numpy(valid)], classes)
