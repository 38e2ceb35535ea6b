"""The `k2jax` command: `k2jax {demo,convert,train,generate,serve,plan} ...`.

Each subcommand lives with the package that does its work and exposes `add_arguments(parser)`
and `run(args) -> int`; only the chosen one is imported, so `k2jax convert` never loads the
server. Errors that are the user's (bad paths, bad configs) print one line, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("k2jax.demo", "build a small model, run a batched forward and a greedy decode"),
    "convert": ("convert.cli", "convert a HF checkpoint to Orbax (or back with --to hf)"),
    "train": ("train.cli", "QAT fine-tuning"),
    "generate": ("serve.generate_cli", "batched generation from the command line"),
    "serve": ("serve.server_cli", "OpenAI-compatible HTTP server"),
    "plan": ("k2jax.plan", "compile a config against an abstract mesh and report memory"),
}


class UserError(Exception):
    """An error in the user's input: printed as one line, exit status 2."""


def _top_level_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items())
    return argparse.ArgumentParser(
        prog="k2jax", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Kimi K2 / K2 Thinking in JAX.",
        epilog=f"commands:\n{lines}\n\nrun `k2jax COMMAND --help` for a command's options",
        usage="k2jax COMMAND [options]")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = _top_level_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"k2jax: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        print(f"k2jax {name}: not available ({e})", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"k2jax {name}", description=help_,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=getattr(module, "EXAMPLE", None))
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"k2jax {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
