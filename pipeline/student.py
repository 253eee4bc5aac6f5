"""Stage two: train a student from the teacher store and the data set alone.

No teacher is constructed here: logits, maps and explanation scores come from the store,
streamed a whole block (shard) at a time.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import __version__
from pipeline.augment import Augmentation, check_flip
from pipeline.config import TrainStudentConfig
from pipeline.data import get_dataset, get_val_split
from pipeline.ddp import Ranks
from pipeline.distill import DistillationLoss, teacher_fields
from pipeline.errors import PipelineError
from pipeline.evaluation import top1
from pipeline.explain import CamLayer, probe_input
from pipeline.heldout import checkpoint_note, judged_top1
from pipeline.models import create_model
from pipeline.models.checkpoint import save_checkpoint
from pipeline.store.info import teacher_table
from pipeline.store.teacher_store import TeacherStore
from pipeline.stream import BlockStream
from pipeline.train import Resume, fit

RESUME_FILE = "resume.pt"  # in the run's folder: the training state saved at every epoch's end
RESUME_FREE = ("resume", "save_every")  # settings a resumed run may change


def choose_teachers(store: TeacherStore, method: str, teacher: str | None, policy: str = "per-sample") -> list[str]:
    """The store teachers a method learns from: `kd` and `at` take the named or the best held-out
    one, explain-kd's `global` policy the one with the lowest mean confidence drop."""
    if method == "ce":
        return []
    if not store.teachers:
        raise PipelineError(f"store {store.path} holds no teachers; run `pipeline extract-teachers` first")
    if method == "explain-kd" and policy == "global":
        drops = teacher_table(store).set_index("teacher")["mean_drop"]
        print(f"explain-kd global: learning from {drops.idxmin()} (mean confidence drop {drops.min():.4f})")
        return [drops.idxmin()]
    if method not in ("kd", "at"):
        return store.teachers
    return [named_or_best_teacher(store, teacher, method)]


def named_or_best_teacher(store: TeacherStore, teacher: str | None, method: str) -> str:
    """`teacher` if given, else the teacher with the best top-1 on this data's held-out split, measured at
    extraction (pipeline.heldout); without it for every teacher, the user names one."""
    if teacher is not None:
        store.teacher_group(teacher)  # fails listing the store's teachers
        return teacher
    attrs = {name: store.teacher_attrs(name) for name in store.teachers}
    judged = {name: judged_top1(a) for name, a in attrs.items()}
    lacking = sorted(name for name, figure in judged.items() if figure is None)
    if lacking:
        raise PipelineError(
            f"{method} needs one teacher, and {', '.join(lacking)} of store {store.path} has no top-1 measured on this "
            "data's held-out split (the data set has none besides its test split; a checkpoint's own figure of "
            f"other data does not count); name one with --teacher, one of: {', '.join(store.teachers)}"
            + ("; or take each sample's logits from the teachers it selects with --kd-source selected"
               if method == "--kd-source best" else ""))
    best = max(sorted(judged), key=lambda name: judged[name][0])
    print(f"{method}: logits from {best} ({judged[best][1]}; {checkpoint_note(attrs[best])}; best of {len(judged)} "
          "teachers)")
    return best


def random_teachers(store: TeacherStore, teachers: list[str], seed: int) -> torch.Tensor:
    """The `random` policy's teacher of every store row: uniform, fixed by the seed alone."""
    return torch.from_numpy(np.random.default_rng([seed, 0x5E1EC7]).integers(0, len(teachers), store.num_samples))


def usable_blocks(store: TeacherStore, teachers: list[str], cfg: TrainStudentConfig) -> list[int]:
    """The blocks finished for every teacher: all of them, or with --allow-partial those there are."""
    blocks = store.finished_blocks(teachers)
    if len(blocks) < store.num_blocks:
        state = f"{len(blocks)}/{store.num_blocks} blocks finished for {', '.join(teachers)}"
        if not cfg.allow_partial or not blocks:
            raise PipelineError(
                f"store {store.path} is incomplete ({state}); rerun the same `pipeline extract-teachers` "
                "command to finish it" + (", or pass --allow-partial" if blocks else "")
            )
        rows = sum(stop - start for start, stop in map(store.block_rows, blocks))
        print(f"--allow-partial: training on {rows} of {store.num_samples} samples ({state})")
    return blocks


def train_student(cfg: TrainStudentConfig) -> dict:
    """Stage two, whole: choose the teachers, stream the store, train (under torchrun: on every rank), and on
    rank 0 validate and write the run's checkpoint and history."""
    ranks = Ranks.from_env()  # torchrun's processes, or this one alone
    device = ranks.start(cfg.device)
    store = TeacherStore.open(cfg.store)
    dataset = ranks.first(lambda: get_dataset(cfg.dataset, cfg.split, cfg.data_root, cfg.split_seed, cfg.download))
    store.check_made_from({"dataset": dataset.identity()})
    teachers = choose_teachers(store, cfg.method, cfg.teacher, cfg.policy)
    target = store.attrs["target"]
    if target == "predicted" and cfg.method == "explain-kd" and cfg.policy == "weighted":
        raise PipelineError(f"store {store.path} caches maps of each teacher's predicted class; --policy weighted "
                            "would mix maps of different classes: choose per-sample, global, correct or random")
    blocks = ranks.agree(lambda: usable_blocks(store, teachers, cfg))
    info = dataset.info
    check_flip(cfg.flip, info)
    fields = ["images", "labels", *teacher_fields(cfg.method, teachers, store.logit_fields)]
    stream = BlockStream(cfg.store, fields, blocks, cfg.batch_size, seed=cfg.seed, mix_blocks=cfg.mix_blocks,
                         dataset=None if store.attrs["stores_images"] else dataset,  # large images come from files
                         workers=cfg.num_workers, eval_view=cfg.views == "eval", rank=ranks.rank, ranks=ranks.world)
    empty = [rank for rank in range(ranks.world) for epoch in range(cfg.epochs) if not stream.num_batches(epoch, rank)]
    if empty:  # every rank finds the same, so all stop alike
        raise PipelineError(f"rank {empty[0]} of {ranks.world} would get no batch in some epoch ({len(blocks)} blocks "
                            "hold readable images); start fewer ranks, or extract with a smaller --block-size")
    if store.num_views > 1 and ranks.main:
        print(f"views: {'view 0 (eval) only' if cfg.views == 'eval' else f'cycling through {store.num_views} per sample'}")
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",  # copies overlap compute
        multiprocessing_context="forkserver" if cfg.num_workers > 0 else None,
    )

    def batches(epoch: int):
        stream.set_epoch(epoch)
        loss_fn.epoch = epoch
        return loader

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.arch, info.image_shape[2], info.num_classes)
    layer = CamLayer.of(model.eval(), probe_input(info.image_shape))
    kd_teacher = named_or_best_teacher(store, cfg.teacher, "--kd-source best") if cfg.kd_source == "best" else None
    loss_fn = DistillationLoss(cfg.method, teachers, layer, info.mean, info.std,
                               cfg.temperature, cfg.alpha, cfg.beta, info.num_classes, policy=cfg.policy,
                               policy_temperature=cfg.policy_temperature, detach_head=cfg.detach_head,
                               beta_warmup=cfg.beta_warmup, augmentation=Augmentation(
                                   cfg.shift, cfg.flip, cfg.seed + 1_000_003 * ranks.rank),  # ranks move unlike
                               map_follows=cfg.map_follows, student_map=cfg.student_map, kd_teacher=kd_teacher,
                               map_norm=cfg.map_norm, map_size=cfg.map_size, target=target,
                               random_choice=random_teachers(store, teachers, cfg.seed)
                               if cfg.method == "explain-kd" and cfg.policy == "random" else None)
    run_name = cfg.run_name or cfg.method
    run_dir = Path(cfg.out_dir) / run_name
    # what a saved state must have been saved under: the settings, and the store, teachers, blocks,
    # device and code it trained on (a store finished or re-extracted since changes the batches)
    identity = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE} | {
        "store_fingerprint": store.attrs["fingerprint"], "blocks": blocks, "device_type": device.type,
        "ranks": ranks.world,
        "teachers": {t: store.teacher_attrs(t)["fingerprint"] for t in teachers}, "code_version": __version__}
    resume = Resume(run_dir / RESUME_FILE, identity, cfg.save_every, (loss_fn.augmentation.generator,), ranks)
    if not cfg.resume and ranks.main:
        resume.done()  # a new run: state another run left here is not continued
    history = fit(model, batches, loss_fn, epochs=cfg.epochs, steps_per_epoch=stream.steps,
                  lr=cfg.lr, weight_decay=cfg.weight_decay, desc=f"student {run_name}",
                  device=device, resume=resume, ranks=ranks)
    ranks.stop()
    if not ranks.main:  # rank 0 evaluates and writes
        return {"run_dir": str(run_dir), "teachers": teachers, "history": history, "val_top1": None}
    val = get_val_split(cfg.dataset, cfg.data_root, cfg.split_seed, cfg.download)
    val_top1 = top1(model.cpu(), val) if val else None
    if val:
        print(f"validation top-1 {val_top1:.4f} ({len(val)} images)")
    save_checkpoint(run_dir / "checkpoint.pt", model, {
        "name": run_name, "arch": cfg.arch, "in_channels": info.image_shape[2], "num_classes": info.num_classes,
        "dataset": dataset.identity(), "transform": {"mean": list(info.mean), "std": list(info.std)},
        "config": dataclasses.asdict(cfg), "teachers": teachers, "store_fingerprint": store.attrs["fingerprint"],
        "history": history, "val_top1": val_top1,
    })
    pd.DataFrame(history).to_csv(run_dir / "history.csv", index=False)
    resume.done()
    return {"run_dir": str(run_dir), "teachers": teachers, "history": history, "val_top1": val_top1}

