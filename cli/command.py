"""The `k2jax` command: `k2jax {demo,convert,train,generate,serve,plan} ...`.

Each subcommand lives with the package that does its work and exposes `add_arguments(parser)`
and `run(args) -> int`; only the chosen one is imported, so `k2jax convert` never loads the
server. Errors that are the user's (bad paths, bad configs, bad meshes) print one line,
`k2jax COMMAND: error: ...`, and exit with status 2, argparse style: `UserError`, a missing file,
or a `ValueError` that this project's code raised. A `ValueError` raised inside a library (JAX,
flax, numpy, ...) is a bug and keeps its traceback, as does every other exception; set
`K2JAX_TRACEBACK=1` to see the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("cli.demo", "build a small model, run a batched forward and a greedy decode"),
    "convert": ("convert.cli", "convert a HF checkpoint to Orbax (or back with --to hf)"),
    "train": ("train.cli", "QAT fine-tuning"),
    "generate": ("serve.generate_cli", "batched generation from the command line"),
    "serve": ("serve.server_cli", "OpenAI-compatible HTTP server"),
    "plan": ("plan.cli", "compile a config against an abstract mesh and report memory"),
}


class UserError(Exception):
    """An error in the user's input: printed as one line, exit status 2."""


# Top-level packages whose own `ValueError`s are messages for the user.
_OWN_PACKAGES = frozenset({"k2jax", "serve", "train", "convert", "plan", "cli", "__main__"})


def _user_error_message(e: BaseException) -> str | None:
    """The one line to print for a user's error, or None for an internal one (traceback)."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, FileNotFoundError):
        if e.filename is not None and e.strerror:  # "[Errno 2] No such file ...: 'x'"
            return f"{e.filename}: {e.strerror[:1].lower()}{e.strerror[1:]}"
        return str(e)
    if isinstance(e, ValueError):
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
        return str(e) if module.split(".")[0] in _OWN_PACKAGES else None
    return None


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
        message = _user_error_message(e)
        if message is None or os.environ.get("K2JAX_TRACEBACK"):
            raise
        print(f"k2jax {name}: error: {message}", file=sys.stderr)
        return 2

