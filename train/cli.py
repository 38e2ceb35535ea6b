"""`k2jax train`: QAT fine-tuning from a preset or a k2jax checkpoint on a JSONL corpus.

Options come from `--config FILE` (YAML with `train.config.TrainConfig` field names), overridden
by flags. `--resume` continues the run in `--out` with the options it started with; flags that
repeat them are accepted, and only those of `train.config.RESUMABLE` may change (see
`train.config.resumed`). Ctrl-C or SIGTERM stops at the next step with a checkpoint of it (exit
status 130 or 143), from which `--resume` continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys

from train.config import OPTIMIZERS, PARAM_GROUPS, RESUMABLE, TrainConfig, TrainConfigError
from train.config import resumed
from train.interrupt import Interrupted, StopRequests

EXAMPLE = """example (tiny model, one CPU, a minute or two):
  for i in $(seq 64); do echo '{"text": "sample '$i': the quick brown fox"}'; done > corpus.jsonl
  k2jax train --preset tiny --data corpus.jsonl --steps 50 --seq-len 64 --batch-size 8 \\
      --qat routed_experts --out runs/tiny --export runs/tiny-int4
  k2jax train --resume --out runs/tiny --steps 100 --export runs/tiny-int4-100

--resume takes every option from the run in --out; only these may change:
  """ + " ".join("--" + name.replace("_", "-") for name in RESUMABLE[1:]) + """
The learning rate keeps the first run's schedule (cosine to --decay-steps, then constant), so
a larger --steps continues at the final rate. Without --export a resumed run exports to the
first run's --export path only if nothing is there yet. Ctrl-C (SIGINT) or SIGTERM saves a
checkpoint of the current step and exits with status 130 or 143; --resume continues from it.
"""

# flag -> TrainConfig field, for the options that map one to one.
_FLAGS = {
    "preset": str, "checkpoint": str, "data": str, "tokenizer": str, "out": str,
    "steps": int, "batch_size": int, "seq_len": int, "grad_accum": int, "seed": int,
    "learning_rate": float, "warmup_steps": int, "decay_steps": int, "min_lr_ratio": float,
    "weight_decay": float, "grad_clip": float, "qk_clip_threshold": float,
    "bias_update_rate": float, "aux_loss_coef": float, "remat_policy": str, "compute_dtype": str,
    "mesh": str, "checkpoint_every": int, "keep_checkpoints": int, "log_every": int,
    "export": str,
}
_HELP = {
    "preset": "model preset (tiny, small, ...) with random initialisation",
    "checkpoint": "k2jax checkpoint directory to fine-tune (INT4 leaves allowed)",
    "data": "JSONL corpus: {'text'}, {'messages', 'tools'} or {'input_ids', 'loss_mask'} lines",
    "tokenizer": "'bytes' or a tiktoken.model",
    "out": "run directory (metrics.jsonl, checkpoints/, train_config.json)",
    "steps": "optimizer steps to run to (on --resume: the new end)",
    "batch_size": "rows per optimizer step", "seq_len": "tokens per row",
    "grad_accum": "micro-batches per step", "seed": "data order and initialisation seed",
    "learning_rate": "peak learning rate", "warmup_steps": "linear warmup steps",
    "decay_steps": "step where the cosine decay ends; constant after it",
    "min_lr_ratio": "final learning rate / peak", "weight_decay": "AdamW / Muon weight decay",
    "grad_clip": "global gradient norm clip", "qk_clip_threshold": "MuonClip QK-clip threshold",
    "bias_update_rate": "router bias step of the aux-loss-free balancing",
    "aux_loss_coef": "weight of the sequence-wise balance loss (0: off)",
    "remat_policy": "jax.checkpoint_policies name, e.g. nothing_saveable",
    "compute_dtype": "activation dtype (master weights stay float32)",
    "mesh": "mesh axes, e.g. 'fsdp=4,expert=2'",
    "checkpoint_every": "steps between checkpoints", "keep_checkpoints": "checkpoints kept",
    "log_every": "steps between metrics records",
    "export": "write the trained model here as a k2jax checkpoint, QAT groups in INT4",
}
# What an unset (None) option means, where the dataclass default alone does not say.
_UNSET = {
    "preset": "tiny, unless --checkpoint is given", "checkpoint": "none",
    "tokenizer": "the checkpoint's tiktoken.model; bytes for a preset",
    "decay_steps": "--steps of the first run", "qk_clip_threshold": "off",
    "remat_policy": "none: every activation is saved", "mesh": "fsdp over every device",
    "export": "no export",
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _default_text(field: str) -> str | None:
    """How `--help` shows `field`'s default; None for a required option."""
    value = _DEFAULTS[field]
    if field in _UNSET or value is dataclasses.MISSING:
        return _UNSET.get(field)
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _help(text: str, default: str | None) -> str:
    """`text` with its default, or "(required)" for None."""
    # '%' is argparse's format character in help strings.
    shown = "required" if default is None else f"default: {default}"
    return f"{text} ({shown})".replace("%", "%%")


def _groups(text: str) -> tuple[str, ...]:
    return () if text in ("", "none") else tuple(g.strip() for g in text.split(",") if g.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Every default is None here so that `build_config` can tell what was typed (which
    # overrides --config and is checked against a resumed run); the help shows the real one.
    parser.add_argument("--config", help=_help("YAML file of TrainConfig options", "none"))
    for field, kind in _FLAGS.items():
        parser.add_argument("--" + field.replace("_", "-"), dest=field, type=kind,
                            help=_help(_HELP[field], _default_text(field)))
    parser.add_argument("--lr", dest="learning_rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", choices=OPTIMIZERS,
                        help=_help("Muon for linear kernels (AdamW for the rest) or AdamW",
                                   _default_text("optimizer")))
    parser.add_argument("--qat", dest="qat_groups", type=_groups,
                        help=_help("linear groups trained with INT4 fake quantization, "
                                   "comma-separated, or 'none'",
                                   "those the checkpoint stores as INT4; none for a preset"))
    parser.add_argument("--trainable", type=_groups,
                        help=_help("parameter groups to train, comma-separated",
                                   "all: " + ",".join(PARAM_GROUPS)))
    parser.add_argument("--whole-documents", action="store_true", default=None,
                        help=_help("pad a row rather than split a document across two rows",
                                   _default_text("whole_documents")))
    parser.add_argument("--resume", action="store_true",
                        help=_help("continue the run in --out from its newest checkpoint", "off"))
    parser.add_argument("--quiet", action="store_true",
                        help=_help("no per-step lines on stdout", "off"))


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The run's config; on `--resume` a line on stderr when a saved export is not redone."""
    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("config", "resume", "quiet")}
    if args.resume:
        if not args.out:
            raise TrainConfigError("--resume needs --out, the run directory")
        if args.config:
            raise TrainConfigError("--resume takes the run's own options, not --config")
        cfg, note = resumed(TrainConfig.load_run(args.out), given)
        if note:
            print(f"k2jax train: {note}", file=sys.stderr, flush=True)
        return cfg
    if args.config:
        return TrainConfig.from_file(args.config, **given)
    return TrainConfig.from_dict(given)


def run(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    # Signals are caught from here on: loading JAX alone takes seconds.
    with StopRequests() as stop:
        from train.trainer import train  # JAX loads only once the options are valid

        try:
            last = train(cfg, resume=args.resume, quiet=args.quiet, stop=stop)
        except Interrupted as e:
            saved = f"checkpoint {e.step} is complete" if e.step else "no checkpoint yet"
            print(f"k2jax train: stopped by {signal.Signals(e.signum).name} at step {e.step}: "
                  f"{saved}; continue with k2jax train --resume --out {cfg.out}",
                  file=sys.stderr, flush=True)
            return e.exit_code
    if last and not args.quiet:
        print(f"done: step {last['step']}, loss {last['loss']:.4f}; run in {cfg.out}")
    return 0
