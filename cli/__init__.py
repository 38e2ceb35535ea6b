"""The `k2jax` command line, above the packages it drives: `k2jax {demo,convert,train,
generate,serve,plan}` (see `cli.command`). The library (`k2jax`, `pallas_kernels`) imports
nothing from here, nor from `convert`, `train`, `serve` or `plan` (`tests/test_layering.py`)."""

from cli.command import COMMANDS, UserError, main

__all__ = ["COMMANDS", "UserError", "main"]
