"""Stage: train a student from a teacher store and the data set alone (no teacher is loaded)."""

from pipeline.config import TrainStudentConfig
from pipeline.student import train_student


def run(cfg: TrainStudentConfig) -> dict:
    return train_student(cfg)
