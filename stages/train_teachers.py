"""Stage: train each teacher with cross-entropy; save checkpoints and their test metrics."""

from pipeline.config import TrainTeachersConfig
from pipeline.teacher_training import train_teachers


def run(cfg: TrainTeachersConfig) -> dict[str, dict]:
    return train_teachers(cfg)
