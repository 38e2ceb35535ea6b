"""`k2jax convert SRC DST [--to orbax|hf]`: the command line of `convert`.

Parses arguments and calls `convert_to_orbax` or `convert_to_hf`; input errors (bad
directories, invalid or incomplete checkpoints) print one line and exit with status 2.
SIGINT and SIGTERM print one line and exit 130 / 143 (128 + the signal, as a shell reports a
process the signal killed): every step of a conversion is safe to stop at, so rerunning the
command resumes it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading

EXAMPLE = """\
example (tiny config on a CPU, seconds):
  python -c "import jax, k2jax; c = k2jax.ModelConfig.preset('tiny'); \\
k2jax.save('/tmp/k2-tiny', c, k2jax.init_params(c, jax.random.key(0)))"
  k2jax convert --to hf /tmp/k2-tiny /tmp/k2-tiny-hf
  k2jax convert /tmp/k2-tiny-hf /tmp/k2-tiny-orbax

Kimi K2 Thinking, INT4 experts kept bit-exactly (rerun the same command to resume):
  k2jax convert ~/models/Kimi-K2-Thinking /data/k2-thinking
"""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, '1000' -> 1000 bytes."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MiB)")
    power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base**power)


def parse_worker(text: str) -> tuple[int, int]:
    """'1/4' -> (1, 4)."""
    index, slash, count = text.partition("/")
    if not (slash and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"not a worker: {text!r} (I/N with 0 <= I < N, "
                                         "e.g. 0/2)")
    return int(index), int(count)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC",
                        help="hub model directory (config.json + safetensors), or with "
                             "--to hf a k2jax checkpoint")
    parser.add_argument("dst", metavar="DST", help="output directory (must not exist)")
    parser.add_argument("--to", choices=("orbax", "hf"), default="orbax",
                        help="orbax: hub -> k2jax checkpoint (default); hf: the way back")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="store every weight in this dtype, dequantizing INT4/FP8 "
                             "(default: as the source, INT4 kept)")
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB",
                        help="--to hf: largest safetensors shard (default 5GB)")
    parser.add_argument("--worker", type=parse_worker, default=(0, 1), metavar="I/N",
                        help="hub -> orbax: convert every N-th unit from the I-th (0-based) "
                             "beside N-1 other workers run with the same arguments (other "
                             "processes, or hosts sharing DST's filesystem); the last to "
                             "finish writes the checkpoint, identical to a one-worker run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


class Interrupted(Exception):
    """The conversion was stopped by signal `signum`."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_interrupt():
    """While active, SIGINT and SIGTERM raise `Interrupted` in the main thread (unwinding
    through the thread pool and open files as any error does). A signal the parent process
    ignores (a background job's SIGINT) stays ignored; off the main thread, nothing changes."""
    def interrupt(signum, frame):
        raise Interrupted(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run(args: argparse.Namespace) -> int:
    try:
        with signals_interrupt():
            return _convert(args)
    except Interrupted as e:
        again = "resume" if args.to == "orbax" else "export again"
        print(f"k2jax convert: interrupted; rerun the same command to {again}", file=sys.stderr)
        return 128 + e.signum


def _convert(args: argparse.Namespace) -> int:
    from convert.reader import ConversionError
    from k2jax.checkpoint import CheckpointError
    from k2jax.config import ConfigError

    progress = not args.no_progress
    try:
        if args.to == "hf":
            if args.dtype:
                raise ConversionError("--dtype applies to hub -> orbax only")
            if args.worker != (0, 1):
                raise ConversionError("--worker applies to hub -> orbax only")
            from convert.to_hf import convert_to_hf

            convert_to_hf(args.src, args.dst, max_shard_bytes=args.max_shard_size,
                          progress=progress)
            print(f"wrote hub model directory {args.dst}")
        else:
            from convert.to_orbax import convert_to_orbax

            config = convert_to_orbax(args.src, args.dst, dtype=args.dtype, progress=progress,
                                      worker=args.worker)
            if not os.path.isfile(os.path.join(args.dst, "config.json")):
                print(f"worker {args.worker[0]}/{args.worker[1]} done; {args.dst} is written "
                      "by the last worker to finish")
                return 0
            int4 = ", INT4: " + ", ".join(config.quantized_linears) if config.quantized_linears \
                else ""
            print(f"wrote k2jax checkpoint {args.dst} ({config.model_type}, "
                  f"{config.num_hidden_layers} layers, {config.dtype}{int4})")
    except (ConversionError, CheckpointError, ConfigError, FileExistsError) as e:
        print(f"k2jax convert: error: {e}", file=sys.stderr)
        return 2
    return 0
