"""Stage two: train a student from the teacher store and the data set alone.

No teacher is constructed here: logits, maps and explanation scores come from the store,
streamed a whole block (shard) at a time.
"""

import dataclasses
from pathlib import Path

import pandas as pd
import torch

from pipeline import __version__
from pipeline.augment import Augmentation, check_flip
from pipeline.data import get_dataset, get_val_split
from pipeline.ddp import Ranks
from pipeline.distill import DistillationLoss, LossSettings
from pipeline.errors import PipelineError
from pipeline.evaluation import top1
from pipeline.explain import CamLayer, probe_input
from pipeline.heldout import named_or_best_teacher
from pipeline.methods import method_of
from pipeline.models import create_model
from pipeline.models.checkpoint import save_checkpoint
from pipeline.policies import POLICIES
from pipeline.store.teacher_store import TeacherStore
from pipeline.stream import BlockStream
from pipeline.student_config import TrainStudentConfig
from pipeline.train import Resume, fit

RESUME_FILE = "resume.pt"  # in the run's folder: the training state saved at every epoch's end
RESUME_FREE = ("resume", "save_every", "cache_dir", "cache_gb")  # settings a resumed run may change


def usable_blocks(store: TeacherStore, teachers: list[str], cfg: TrainStudentConfig) -> list[int]:
    """The blocks finished for every teacher: all of them, or with --allow-partial those there are."""
    blocks = store.finished_blocks(teachers)
    if len(blocks) < store.num_blocks:
        state = f"{len(blocks)}/{store.num_blocks} blocks finished for {', '.join(teachers)}"
        if not cfg.allow_partial or not blocks:
            raise PipelineError(
                f"store {store.location} is incomplete ({state}); rerun the same `pipeline extract-teachers` "
                "command to finish it" + (", or pass --allow-partial" if blocks else "")
            )
        rows = sum(stop - start for start, stop in map(store.block_rows, blocks))
        print(f"--allow-partial: training on {rows} of {store.num_samples} samples ({state})")
    return blocks


def check_map_mix(location, target: str, policy, cfg: TrainStudentConfig) -> None:
    """Refuse a map term that would mix teachers' maps of different classes (a store of predicted-class maps and
    a policy that mixes teachers); logits alone mix safely."""
    if target == "predicted" and policy is not None and policy.mixes_maps and cfg.beta > 0:
        unmixed = [name for name in POLICIES.names() if not POLICIES.get(name).mixes_maps]
        raise PipelineError(f"store {location} caches maps of each teacher's predicted class, and --policy {cfg.policy} "
                            f"with a map term (--beta {cfg.beta}) would mix maps of different classes: pass --beta 0, "
                            f"or --policy {' | '.join(unmixed)}")


def capture_step(loss_fn: DistillationLoss, method, cfg: TrainStudentConfig, device: torch.device, ranks: Ranks) -> None:
    """--compile: full batches' terms as one captured graph, where the step allows it."""
    if ranks.world > 1:
        raise PipelineError("--compile under torchrun is not built (DDP splits a captured step at its gradient "
                            "buckets); drop --compile")
    if cfg.beta_warmup:
        raise PipelineError(f"--compile with --beta-warmup {cfg.beta_warmup}: the map weight changes every warm-up "
                            "epoch, and the step would be captured again each time; drop one of them")
    if method.double_backward(cfg):
        if ranks.main:
            print("--compile: this recipe's step differentiates the student's Grad-CAM (a double backward), which "
                  "torch.compile does not capture; it runs uncaptured")
        return
    loss_fn.capture(device, cfg.batch_size)


def train_student(cfg: TrainStudentConfig) -> dict:
    """Stage two, whole: choose the teachers, stream the store, train (under torchrun: on every rank), and on
    rank 0 validate and write the run's checkpoint and history."""
    ranks = Ranks.from_env()  # torchrun's processes, or this one alone
    device = ranks.start(cfg.device)
    store = TeacherStore.open(cfg.store)
    dataset = ranks.first(lambda: get_dataset(cfg.dataset, cfg.split, cfg.data_root, cfg.split_seed, cfg.download))
    store.check_holds(dataset.identity())
    method, policy = method_of(cfg.method), POLICIES.get(cfg.policy)(cfg.policy_temperature)
    teachers = method.teachers(store, cfg.teacher, policy)
    policy = policy if method.follows_policy else None
    target = store.attrs["target"]
    check_map_mix(store.location, target, policy, cfg)
    blocks = ranks.agree(lambda: usable_blocks(store, teachers, cfg))
    if policy is not None:
        policy.fit(store, teachers, cfg.seed, blocks).to(device)  # the blocks the ranks agreed on: alike on each
    info = dataset.info
    check_flip(cfg.flip, info)
    fields = ["images", "labels", *method.arrays(teachers, store.logit_fields)]
    stream = BlockStream(cfg.store, fields, blocks, cfg.batch_size, seed=cfg.seed, mix_blocks=cfg.mix_blocks,
                         dataset=None if store.attrs["stores_images"] else dataset,  # large images come from files
                         workers=cfg.num_workers, eval_view=cfg.views == "eval", rank=ranks.rank, ranks=ranks.world,
                         cache_dir=cfg.cache_dir, cache_bytes=int(cfg.cache_gb * 1e9), device=device)
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
        return map(stream.on_device, loader)

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.arch, info.image_shape[2], info.num_classes)
    layer = CamLayer.of(model.eval(), probe_input(info.image_shape))
    kd_teacher = named_or_best_teacher(store, cfg.teacher, "--kd-source best") if cfg.kd_source == "best" else None
    loss_fn = DistillationLoss(
        method, teachers, layer, info.mean, info.std, info.num_classes, LossSettings.of(cfg),
        augmentation=Augmentation(cfg.shift, cfg.flip, cfg.seed + 1_000_003 * ranks.rank,  # ranks move unlike;
                                  device if cfg.compile else torch.device("cpu")),  # a captured step draws on the GPU
        kd_teacher=kd_teacher, target=target, policy=policy)
    if ranks.main:
        print(f"recipe: {method.describe(cfg, teachers, kd_teacher)}")
    if cfg.compile:
        capture_step(loss_fn, method, cfg, device, ranks)
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
                  lr=cfg.lr, weight_decay=cfg.weight_decay, schedule=cfg.lr_schedule_of(), desc=f"student {run_name}",
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

