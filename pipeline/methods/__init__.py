"""The student methods, one module each, registered in `METHODS` by their `--method` names."""

from pipeline.methods import at, ce, explain_kd, kd, kd_avg, weighted_kd  # noqa: F401  (each registers itself)
from pipeline.methods.base import METHODS, Method

__all__ = ["METHODS", "Method", "method_of"]


def method_of(name: str) -> Method:
    """The method `name` (an unknown name fails listing the known ones)."""
    return METHODS.get(name)()
