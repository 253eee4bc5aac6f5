"""Multi-teacher knowledge distillation guided by Grad-CAM explanations.

Stage one (`pipeline extract-teachers`) runs every teacher once and caches its logits,
Grad-CAM maps and explanation scores in a Zarr v3 store; stage two
(`pipeline train-student`) trains students from that store without loading a teacher.
"""

__version__ = "0.1.0"
