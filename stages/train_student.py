"""Stage: train a student from a teacher store and the data set alone (no teacher is loaded)."""

from pipeline.student import train_student
from pipeline.student_config import TrainStudentConfig


def run(cfg: TrainStudentConfig) -> dict:
    return train_student(cfg)
