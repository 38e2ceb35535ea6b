"""`k2jax plan`: the programs that serving and training run, compiled against a mesh with no
real arrays, and their per-device memory and collectives (`plan.cli`, `plan.report`)."""

from plan.collectives import collective_bytes
from plan.report import format_report, plan, tree_bytes

__all__ = ["collective_bytes", "format_report", "plan", "tree_bytes"]
