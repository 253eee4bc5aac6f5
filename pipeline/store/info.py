"""What `pipeline store info` and `pipeline store verify` say about a teacher store.

Both walk the store one block at a time, so they work on stores far larger than memory.
"""


import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.evidence import store_evidence
from pipeline.scoring import confidence_drop, lowest
from pipeline.store.integrity import Damage, finished_marks, sound_layout
from pipeline.store.layout import (DIGESTS, EXTRACTION_VERSION, STORE_IDENTITY, TEACHER_IDENTITY, TEACHERS, digest_array,
                                   fingerprint, teacher_array)
from pipeline.store.teacher_store import TeacherStore, view_shapes


def teacher_table(store: TeacherStore) -> pd.DataFrame:
    """Per teacher: cached-split top-1, mean confidence drop, best-explainer share (and the part of it
    won on a tie of drops, decided by the larger Y), map size, bytes, blocks."""
    names = store.teachers
    stats = {name: {"correct": 0, "drop": 0.0, "best": 0, "tie": 0} for name in names}
    shared_rows = 0
    for evidence in store_evidence(store, names):  # the readable rows of the blocks every teacher finished
        drops = confidence_drop(evidence.y, evidence.o)
        best, tie = lowest(drops, evidence.y)
        for m, name in enumerate(names):
            s = stats[name]
            s["correct"] += int(evidence.correct[:, m].sum())
            s["drop"] += float(drops[:, m].sum())
            s["best"] += int((best == m).sum())
            s["tie"] += int(((best == m) & tie).sum())
        shared_rows += len(evidence.y)
    table = []
    for name in names:
        attrs, s = store.teacher_attrs(name), stats[name]
        done = store.num_blocks - len(store.pending_blocks(name))
        heldout = attrs.get("heldout") or {}
        table.append({
            "teacher": name, "arch": attrs.get("arch"),
            "heldout_top1": heldout.get("top1", float("nan")), "heldout_drop": heldout.get("mean_drop", float("nan")),
            "top1": s["correct"] / shared_rows if shared_rows else float("nan"),
            "mean_drop": s["drop"] / shared_rows if shared_rows else float("nan"),
            "best_explainer": s["best"] / shared_rows if shared_rows else float("nan"),
            "best_by_tie": s["tie"] / shared_rows if shared_rows else float("nan"),
            "layer": attrs.get("target_layer"), "map": "x".join(map(str, attrs.get("map_shape", []))),
            "bytes": store.location.size(f"{TEACHERS}/{name}"),
            "blocks": f"{done}/{store.num_blocks}",
        })
    return pd.DataFrame(table)


def views_text(views: dict) -> str:
    if views["count"] == 1:
        return "1 (the eval view)"
    kind = "resized crops" if views["eval_crop"] else f"crops padded by {views['shift']} px"
    return (f"{views['count']}: the eval view and {views['count'] - 1} random {kind}"
            f"{', flipped at random' if views['flip'] else ''} (seed {views['seed']})")


def logits_text(mode: dict) -> str:
    return "all classes" if mode["mode"] == "full" else f"top {mode['k']} (with class indices and the log-sum-exp of the rest)"


def describe(store: TeacherStore) -> str:
    """The text of `pipeline store info`."""
    attrs, dataset = store.attrs, store.attrs["dataset"]
    names = store.teachers
    complete = names and len(store.finished_blocks(names)) == store.num_blocks
    lines = [
        f"store      {store.location}  ({attrs['format']} v{attrs['version']}, {store.location.size():,} bytes)",
        f"dataset    {dataset['name']}/{dataset['split']}: {dataset['num_samples']} samples, "
        f"{dataset['num_classes']} classes, images {'x'.join(map(str, dataset['image_shape']))}",
        f"target     {attrs['target']}; blocks of {attrs['block_size']} rows: {store.num_blocks}",
        f"logits     {logits_text(store.logits_mode)}",
        f"views      {views_text(attrs['views'])}",
        f"skipped    {int((~store.read_rows(0, store.num_samples, ['valid'])['valid']).sum())} unreadable "
        "image(s) (valid = False)",
        f"complete   {'yes' if complete else 'no'}",
        "",
    ]
    table = teacher_table(store)
    body = table.to_string(index=False, float_format=lambda v: f"{v:.4f}") if len(table) else "(no teachers)"
    lines.append(body)
    lines.append(f"heldout_top1 and heldout_drop: on the {heldout_text(store)}, measured at extraction (what kd, at "
                 "and --kd-source best choose by); layer and map: where each teacher's Grad-CAM is taken, its size.")
    lines.append("top1, mean_drop and best_explainer are over the eval view (view 0) of the blocks that every "
                 "teacher has finished; best_by_tie: the part of best_explainer where two or more teachers had the lowest drop "
                 f"(the larger Y chose){tie_total(table)}.")
    return "\n".join(lines)


def heldout_text(store: TeacherStore) -> str:
    judged = [store.teacher_attrs(name).get("heldout") for name in store.teachers]
    first = next((j for j in judged if j), None)
    return f"{first['samples']} images of the held-out {first['split']} split" if first else \
        "held-out split (this data set has none: NaN)"


def tie_total(table: pd.DataFrame) -> str:
    return f"; ties decided {table.best_by_tie.sum():.2%} of the rows" if len(table) and table.best_by_tie.notna().all() else ""


def verify(store: TeacherStore, damage: list[Damage], quick: bool = False) -> list[str]:
    """Every problem found: incompleteness, wrong shapes, fingerprint mismatch, the `damage` found by
    `integrity.find_damage`, and (unless `quick`) values out of range in the blocks not damaged."""
    attrs, problems, bad_shapes, finished = store.attrs, [], [], {}
    n = store.num_samples
    record = {key: attrs.get(key) for key in STORE_IDENTITY}
    if attrs.get("fingerprint") != fingerprint(record):
        problems.append(f"root fingerprint does not match the {'/'.join(STORE_IDENTITY)} attributes")
    if attrs.get("extraction_version") != EXTRACTION_VERSION:
        problems.append(f"made by extraction version {attrs.get('extraction_version')}, this code's is "
                        f"{EXTRACTION_VERSION}: stale; rebuild it with its `pipeline extract-teachers` command and "
                        "--on-change replace")
    for array in store.shared_arrays:
        if not sound_layout(store, array):
            bad_shapes.append(f"{array}: missing, or not {n} rows in shards of {store.block_size}")
    if not sound_layout(store, DIGESTS):
        bad_shapes.append(f"{DIGESTS}: missing, or not one row of digests per block for the shared arrays' files")
    for array, (shape, dtype) in view_shapes(n, store.num_views).items():
        if sound_layout(store, array) and (store.group[array].shape, str(store.group[array].dtype)) != (shape, dtype):
            bad_shapes.append(f"{array}: {store.group[array].dtype} {store.group[array].shape}, expected {dtype} {shape}")
    if not store.teachers:
        problems.append("the store holds no teachers")
    for name in store.teachers:
        try:
            group, t_attrs = store.teacher_group(name), store.teacher_attrs(name)
        except PipelineError as error:  # registered, its folder lost
            problems.append(str(error).split(f"store {store.location} is ", 1)[-1])
            continue
        if t_attrs.get("fingerprint") != fingerprint({k: t_attrs.get(k) for k in TEACHER_IDENTITY}):
            problems.append(f"{name}: fingerprint does not match its identity attributes")
        if not sound_layout(store, digest_array(name)):
            bad_shapes.append(f"{name}/{DIGESTS}: missing, or not one row of digests per block for its files")
        for field, (shape, dtype) in store.teacher_shapes(t_attrs.get("map_shape", [])).items():
            if field not in group:
                bad_shapes.append(f"{name}/{field}: missing")
            elif (group[field].shape, str(group[field].dtype)) != (shape, dtype):
                bad_shapes.append(f"{name}/{field}: {group[field].dtype} {group[field].shape}, expected {dtype} {shape}")
        done, _ = finished_marks(store, name)  # undecodable marks are listed in `damage`
        finished[name], pending = np.flatnonzero(done), np.flatnonzero(~done)
        if len(pending):
            problems.append(f"{name}: {len(pending)} of {store.num_blocks} blocks unfinished (first: {pending[0]})")
    problems += [f"damaged: {item}" for item in damage]
    if bad_shapes:
        return problems + bad_shapes  # values cannot be read block-wise from arrays of the wrong shape
    damaged = {(item.teacher, item.block) for item in damage}
    for name in [] if quick else finished:
        for block, view in ((int(b), v) for b in finished[name] for v in range(store.num_views)):
            if {(name, block), (None, block)} & damaged:
                continue
            at = f"block {block}" + (f" view {view}" if store.num_views > 1 else "")
            fields = ["valid", "labels", "view_boxes", *(teacher_array(name, f) for f in store.teacher_fields)]
            rows = store.read_rows(*store.block_rows(block), fields, view)
            for field in ("logits", "tail_logsumexp", "cam_max", "y_prob", "o_prob", "attention_max"):
                if teacher_array(name, field) in rows:
                    values = rows[teacher_array(name, field)].astype(np.float64)
                    if not np.isfinite(values).all():
                        problems.append(f"{name}/{field}: NaN or infinite values in {at}")
            valid = rows["valid"]  # skipped unreadable images hold zeros
            boxes = rows["view_boxes"][valid]
            if ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
                problems.append(f"view_boxes: an empty box of a readable image in {at}")
            y, o = rows[teacher_array(name, "y_prob")][valid], rows[teacher_array(name, "o_prob")][valid]
            if (y <= 0).any() or (y > 1).any() or (o < 0).any() or (o > 1).any():
                problems.append(f"{name}: y_prob/o_prob outside (0, 1] / [0, 1] in {at}")
            for field in ("cam_max", "attention_max"):
                if (rows[teacher_array(name, field)] < 0).any():
                    problems.append(f"{name}/{field}: negative scale in {at}")
            explained = rows[teacher_array(name, "cam_class")][valid]
            if attrs["target"] == "label" and (explained != rows["labels"][valid]).any():
                problems.append(f"{name}/cam_class: a map of a class other than the label in {at}")
            if ((explained < 0) | (explained >= attrs["dataset"]["num_classes"])).any():
                problems.append(f"{name}/cam_class: a class outside 0..{attrs['dataset']['num_classes'] - 1} in {at}")
    return problems
