"""`TrainConfig`: every option of a QAT fine-tuning run, one frozen dataclass.

Loaded from YAML (or JSON) with `TrainConfig.from_file`, overridden field by field from the
command line, and stored as `OUT/train_config.json` so that `--resume` continues the same run.
Unknown keys and out-of-range values raise `TrainConfigError`, never pass silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import yaml

from k2jax.config import LINEAR_GROUPS

# Parameter groups that can be trained or frozen: the INT4-capable linear groups plus the
# embedding, the routers' weights and the RMSNorm scales. The routers' `e_score_correction_bias`
# belongs to none of them: it is load-balancing state and never trained.
PARAM_GROUPS = LINEAR_GROUPS + ("embed", "router", "norms")
OPTIMIZERS = ("adamw", "muon")
CONFIG_FILE = "train_config.json"
# What a resumed run may change: how long it runs, what it keeps, logs and writes; not what or
# how it trains, which would make the resumed run a different run from the checkpoint on.
RESUMABLE = ("out", "steps", "export", "checkpoint_every", "keep_checkpoints", "log_every")


class TrainConfigError(ValueError):
    """An invalid training option (printed as one line by the CLI)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Options of one training run.

    Model: `preset` (a `ModelConfig.preset` name) or `checkpoint` (a k2jax checkpoint directory,
    INT4 leaves included); `compute_dtype` for activations and matmul inputs (master weights and
    optimizer state are always float32); `remat_policy` a `jax.checkpoint_policies` name.
    Data: `data` a JSONL file (see `train.data`); `tokenizer` "bytes" or a `tiktoken.model`
    path (default: the checkpoint's own `tiktoken.model`; bytes for a preset); `batch_size` rows
    of `seq_len` tokens per optimizer step, split into `grad_accum` micro-batches;
    `whole_documents` pads a row rather than split a document that fits in one across two.
    Optimizer: AdamW, or Muon for the linear kernels with AdamW for the rest; linear warmup to
    `learning_rate` then cosine decay to `min_lr_ratio * learning_rate` at step `decay_steps`
    (None: `steps`; a resumed run keeps its first run's value, so that `steps` can grow
    without moving the schedule), constant after it; `grad_clip` the global norm;
    `qk_clip_threshold` enables K2's QK-clip (MuonClip) at that max attention logit.
    QAT: `qat_groups` the linear groups trained with INT4 fake quantization (None: those the
    model config stores as INT4). `trainable` the parameter groups that receive updates.
    MoE: `bias_update_rate` of the aux-loss-free balancing, `aux_loss_coef` of the optional
    sequence-wise auxiliary loss.
    Run: `mesh` ("fsdp=4,expert=2"; default: fsdp over every device), `out` the run directory.
    """

    data: str
    out: str
    preset: str | None = "tiny"
    checkpoint: str | None = None
    tokenizer: str | None = None
    compute_dtype: str = "bfloat16"
    remat_policy: str | None = None
    seq_len: int = 128
    whole_documents: bool = False
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 100
    seed: int = 0
    optimizer: str = "adamw"
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    qk_clip_threshold: float | None = None
    qat_groups: tuple[str, ...] | None = None
    trainable: tuple[str, ...] = PARAM_GROUPS
    bias_update_rate: float = 1e-3
    aux_loss_coef: float = 0.0
    mesh: str | None = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    export: str | None = None

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise TrainConfigError(msg)

        need((self.preset is None) != (self.checkpoint is None),
             "give exactly one of preset and checkpoint")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "checkpoint_every",
                     "keep_checkpoints", "log_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(isinstance(self.whole_documents, bool),
             f"whole_documents must be true or false, got {self.whole_documents!r}")
        need(self.batch_size % self.grad_accum == 0,
             f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}")
        need(self.compute_dtype in ("bfloat16", "float32", "float16"),
             f"compute_dtype must be bfloat16, float16 or float32, got {self.compute_dtype!r}")
        need(self.learning_rate > 0, "learning_rate must be positive")
        need(0 <= self.warmup_steps, "warmup_steps must be >= 0")
        need(self.decay_steps is None or (isinstance(self.decay_steps, int)
                                          and self.decay_steps > 0),
             f"decay_steps must be a positive integer or null, got {self.decay_steps!r}")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must lie in [0, 1]")
        need(self.weight_decay >= 0, "weight_decay must be >= 0")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip must be positive or null")
        need(self.qk_clip_threshold is None or self.qk_clip_threshold > 0,
             "qk_clip_threshold must be positive or null")
        need(self.bias_update_rate >= 0, "bias_update_rate must be >= 0")
        need(self.aux_loss_coef >= 0, "aux_loss_coef must be >= 0")
        unknown = set(self.qat_groups or ()) - set(LINEAR_GROUPS)
        need(not unknown, f"qat_groups {sorted(unknown)} unknown; choose from {LINEAR_GROUPS}")
        unknown = set(self.trainable) - set(PARAM_GROUPS)
        need(not unknown, f"trainable {sorted(unknown)} unknown; choose from {PARAM_GROUPS}")
        need(bool(self.trainable), "trainable is empty: nothing to train")
        need(self.qk_clip_threshold is None or "attention" in self.trainable,
             "qk_clip_threshold rescales attention weights, which trainable freezes")
        if self.remat_policy is not None:
            import jax

            need(hasattr(jax.checkpoint_policies, self.remat_policy),
                 f"remat_policy {self.remat_policy!r} is not a jax.checkpoint_policies name")

    @property
    def schedule_steps(self) -> int:
        """The step at which the cosine decay ends (`decay_steps`, or `steps` if unset)."""
        return self.steps if self.decay_steps is None else self.decay_steps

    # ---- construction -------------------------------------------------------------------
    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainConfigError(f"unknown training options {unknown}")
        fields = dict(data)
        if fields.get("checkpoint") is not None and "preset" not in fields:
            fields["preset"] = None  # a checkpoint replaces the default preset
        for name in ("qat_groups", "trainable"):
            if isinstance(fields.get(name), str):
                fields[name] = tuple(g for g in fields[name].split(",") if g)
            elif fields.get(name) is not None:
                fields[name] = tuple(fields[name])
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in fields]
        if missing:
            raise TrainConfigError(f"missing required options {missing}")
        return cls(**fields)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "TrainConfig":
        """Reads YAML or JSON (JSON is YAML); `overrides` (not None) replace file values."""
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise TrainConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise TrainConfigError(f"{path}: expected a mapping of options")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("qat_groups", "trainable"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    def save(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)

    @classmethod
    def load_run(cls, directory: str | os.PathLike) -> "TrainConfig":
        """The config a run in `directory` was started with."""
        path = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(path):
            raise TrainConfigError(f"{directory}: no {CONFIG_FILE}; nothing to resume")
        with open(path) as f:
            return cls.from_dict(json.load(f))


def resumed(saved: TrainConfig, given: Mapping[str, Any]) -> tuple[TrainConfig, str | None]:
    """`(config, note)` of a run resumed from `saved` with the options `given` on the command line.

    `given` may repeat saved values; of the rest only `RESUMABLE` options may differ. The cosine
    decay keeps the saved run's end (`decay_steps`), so a larger `steps` extends the run at the
    final learning rate instead of stretching the schedule under the steps already taken. An
    `export` given is used as given; the saved one only while nothing is there yet (a finished
    earlier export is never written to again), and `note` then says why nothing is exported.
    """
    changed = [f"{k} (run: {getattr(saved, k)!r}, given: {v!r})" for k, v in given.items()
               if k not in RESUMABLE and getattr(saved, k) != v]
    if changed:
        raise TrainConfigError(f"--resume continues the run as it started; only "
                               f"{', '.join(RESUMABLE[1:])} may change, not {'; '.join(changed)}")
    cfg = saved.replace(decay_steps=saved.schedule_steps,
                        **{k: v for k, v in given.items() if k in RESUMABLE})
    if "export" not in given and cfg.export and os.path.exists(cfg.export):
        note = (f"not exporting: {cfg.export} already holds an earlier export of this run; "
                f"pass --export PATH to export step {cfg.steps}")
        return cfg.replace(export=None), note
    return cfg, None
