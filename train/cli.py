"""`k2jax train`: QAT fine-tuning from a preset or a k2jax checkpoint on a JSONL corpus.

Options come from `--config FILE` (YAML with `train.config.TrainConfig` field names), overridden
by flags. `--resume` continues the run in `--out` with the options it started with (flags that
repeat them are accepted; only `--steps` and `--export` may change).
"""

from __future__ import annotations

import argparse

from train.config import OPTIMIZERS, TrainConfig, TrainConfigError

EXAMPLE = """example (tiny model, one CPU, a minute or two):
  for i in $(seq 64); do echo '{"text": "sample '$i': the quick brown fox"}'; done > corpus.jsonl
  k2jax train --preset tiny --data corpus.jsonl --steps 50 --seq-len 64 --batch-size 8 \\
      --qat routed_experts --out runs/tiny --export runs/tiny-int4
  k2jax train --resume --out runs/tiny --steps 100 --export runs/tiny-int4-100
"""

# flag -> TrainConfig field, for the options that map one to one.
_FLAGS = {
    "preset": str, "checkpoint": str, "data": str, "tokenizer": str, "out": str,
    "steps": int, "batch_size": int, "seq_len": int, "grad_accum": int, "seed": int,
    "learning_rate": float, "warmup_steps": int, "min_lr_ratio": float, "weight_decay": float,
    "grad_clip": float, "qk_clip_threshold": float, "bias_update_rate": float,
    "aux_loss_coef": float, "remat_policy": str, "compute_dtype": str, "mesh": str,
    "checkpoint_every": int, "keep_checkpoints": int, "log_every": int, "export": str,
}
_HELP = {
    "preset": "model preset (tiny, small, ...) with random initialisation",
    "checkpoint": "k2jax checkpoint directory to fine-tune (INT4 leaves allowed)",
    "data": "JSONL corpus: {'text'}, {'messages', 'tools'} or {'input_ids', 'loss_mask'} lines",
    "tokenizer": "'bytes' or a tiktoken.model (default: the checkpoint's; bytes for presets)",
    "out": "run directory (metrics.jsonl, checkpoints/, train_config.json)",
    "batch_size": "rows per optimizer step", "seq_len": "tokens per row",
    "grad_accum": "micro-batches per step", "learning_rate": "peak learning rate",
    "grad_clip": "global gradient norm clip", "qk_clip_threshold": "MuonClip QK-clip threshold",
    "bias_update_rate": "router bias step of the aux-loss-free balancing",
    "aux_loss_coef": "weight of the sequence-wise balance loss (0: off)",
    "remat_policy": "jax.checkpoint_policies name, e.g. nothing_saveable",
    "compute_dtype": "activation dtype (master weights stay float32)",
    "mesh": "mesh axes, e.g. 'fsdp=4,expert=2' (default: fsdp over all devices)",
    "export": "write the trained model here as a k2jax checkpoint, QAT groups in INT4",
}
_RESUMABLE = {"steps", "export", "out"}


def _groups(text: str) -> tuple[str, ...]:
    return () if text in ("", "none") else tuple(g.strip() for g in text.split(",") if g.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of TrainConfig options")
    for field, kind in _FLAGS.items():
        parser.add_argument("--" + field.replace("_", "-"), dest=field, type=kind,
                            help=_HELP.get(field))
    parser.add_argument("--lr", dest="learning_rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", choices=OPTIMIZERS)
    parser.add_argument("--qat", dest="qat_groups", type=_groups,
                        help="linear groups trained with INT4 fake quantization, comma-separated,"
                             " or 'none' (default: those the checkpoint stores as INT4)")
    parser.add_argument("--trainable", type=_groups,
                        help="parameter groups to train, comma-separated (default: all)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its newest checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no per-step lines on stdout")


def build_config(args: argparse.Namespace) -> TrainConfig:
    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("config", "resume", "quiet")}
    if args.resume:
        if not args.out:
            raise TrainConfigError("--resume needs --out, the run directory")
        saved = TrainConfig.load_run(args.out)
        changed = sorted(k for k, v in given.items()
                         if k not in _RESUMABLE and getattr(saved, k) != v)
        if changed or args.config:
            raise TrainConfigError(f"--resume continues with the run's own options; only "
                                   f"--steps and --export may change (given: "
                                   f"{changed or '--config'})")
        return saved.replace(**{k: v for k, v in given.items() if k in _RESUMABLE - {"out"}})
    if args.config:
        return TrainConfig.from_file(args.config, **given)
    return TrainConfig.from_dict(given)


def run(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    from train.trainer import train  # JAX loads only once the options are valid

    last = train(cfg, resume=args.resume, quiet=args.quiet)
    if last and not args.quiet:
        print(f"done: step {last['step']}, loss {last['loss']:.4f}; run in {cfg.out}")
    return 0
