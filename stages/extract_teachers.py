"""Stage: run every teacher once over a split and cache its artefacts in a teacher store."""

from pipeline.cache import TeacherStore
from pipeline.config import ExtractConfig
from pipeline.extraction import extract_teachers


def run(cfg: ExtractConfig) -> TeacherStore:
    return extract_teachers(cfg)
