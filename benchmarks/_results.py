"""Where a benchmark's JSON goes: nowhere unless asked, so that a run never overwrites the
committed numbers in `benchmarks/results/` by accident.

    --write        save to benchmarks/results/NAME.json (the numbers RESULTS.md reports)
    --json PATH    save to PATH
"""

from __future__ import annotations

import argparse
import json
import pathlib

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """`--write` and `--json PATH` (exclusive) for the benchmark `name`."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true",
                       help=f"save the results to benchmarks/results/{name}.json")
    group.add_argument("--json", metavar="PATH", type=pathlib.Path,
                       help="save the results to PATH (default: print only)")


def path(args: argparse.Namespace, name: str) -> pathlib.Path | None:
    """The file the results go to, or None when neither option was given."""
    if args.json is not None:
        return args.json
    return RESULTS_DIR / f"{name}.json" if args.write else None


def write(args: argparse.Namespace, name: str, results: dict, indent: int = 2) -> None:
    """Saves `results` where the options say (nothing without them) and says where."""
    target = path(args, name)
    if target is None:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=indent) + "\n")
    print(f"wrote {target}")
