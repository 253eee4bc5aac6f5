"""Stage: run every teacher once over a split and cache its artefacts in a teacher store."""

from pipeline.config import ExtractConfig
from pipeline.extraction import extract_teachers
from pipeline.store.teacher_store import TeacherStore


def run(cfg: ExtractConfig) -> TeacherStore:
    return extract_teachers(cfg)
