"""Stage: test metrics of every student next to the teachers', as JSON and a printed table."""

from pipeline.config import EvaluateConfig
from pipeline.evaluation import evaluate_runs


def run(cfg: EvaluateConfig) -> dict:
    return evaluate_runs(cfg)
