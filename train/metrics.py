"""Training metrics: a JSON line per logged step in `OUT/metrics.jsonl`, a short line on stdout,
and the FLOP count behind the MFU estimate.

A JSONL record holds `step`, `loss`, `balance_loss`, `grad_norm`, `learning_rate`, `tokens`
(trained target tokens), `step_seconds`, `tokens_per_second` (all input tokens), `mfu` (null
where the accelerator's peak is unknown, e.g. on CPU), `expert_load` (`[L_moe][E]` token copies)
and `expert_load_max_over_mean` per MoE layer; with QK-clip also `max_logit` and `clipped_heads`.
The same scalars go to TensorBoard event files in `OUT/tensorboard/` (`tensorboard --logdir
OUT`), the load imbalance as one `expert_load_max_over_mean/layer_I` scalar per MoE layer.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from k2jax.config import ModelConfig

TENSORBOARD_DIR = "tensorboard"

# Dense bf16 peak FLOP/s per device, by a substring of `jax.Device.device_kind`.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def peak_flops(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    return next((flops for name, flops in PEAK_FLOPS if name in kind), None)


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Matmul FLOPs of forward + backward per token (3 x 2 x multiply-adds), attention over
    `seq_len / 2` keys on average (causal)."""
    d, n = config.hidden_size, config.num_attention_heads
    h, r, u, c = (config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim,
                  config.kv_lora_rank)
    q = (d * config.q_lora_rank + config.q_lora_rank * n * (h + r) if config.q_lora_rank
         else d * n * (h + r))
    attention = q + d * (c + r) + c * n * (h + u) + n * u * d + n * (h + r + u) * seq_len / 2
    dense = 3 * d * config.intermediate_size
    moe = (d * config.n_routed_experts
           + (config.num_experts_per_tok + config.n_shared_experts)
           * 3 * d * config.moe_intermediate_size)
    macs = (config.num_hidden_layers * attention + config.num_dense_layers * dense
            + config.num_moe_layers * moe + d * config.vocab_size)
    return 6.0 * macs


def load_summary(load_le) -> dict:
    """Per-layer expert load: copies per expert and the max/mean imbalance."""
    load = np.asarray(load_le)
    mean = np.maximum(load.mean(axis=-1), 1e-9) if load.size else np.zeros(0)
    return {"expert_load": load.tolist(),
            "expert_load_max_over_mean": (load.max(axis=-1) / mean).round(4).tolist()
            if load.size else []}


class MetricsLog:
    """Appends records to `OUT/metrics.jsonl` and prints them (process 0 only)."""

    def __init__(self, run_dir: str, resume_step: int | None, quiet: bool = False):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.quiet = quiet
        self.primary = jax.process_index() == 0
        self.events = None
        if self.primary:
            self._truncate(resume_step or 0)
            from tensorboardX import SummaryWriter

            # purge_step hides the events a resumed run logs again, as _truncate does.
            self.events = SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR),
                                        purge_step=resume_step + 1 if resume_step else None)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None

    def _truncate(self, last_step: int) -> None:
        """Drops records past `last_step`: a resumed run logs those steps again."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def write(self, record: dict) -> None:
        if not self.primary:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._write_events(record)
        if not self.quiet:
            mfu = f" | mfu {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else ""
            clip = (f" | max logit {record['max_logit']:.1f}" if "max_logit" in record else "")
            print(f"step {record['step']:>6} | loss {record['loss']:.4f} | grad norm "
                  f"{record['grad_norm']:.3f} | lr {record['learning_rate']:.2e} | "
                  f"{record['tokens_per_second']:,.0f} tok/s{mfu}{clip} | expert load max/mean "
                  f"{max(record['expert_load_max_over_mean'], default=0):.2f}", flush=True)

    def _write_events(self, record: dict) -> None:
        step = record["step"]
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self.events.add_scalar(name, value, step)
        for layer, value in enumerate(record.get("expert_load_max_over_mean", [])):
            self.events.add_scalar(f"expert_load_max_over_mean/layer_{layer}", value, step)
        self.events.flush()


def record(step: int, metrics: dict, seconds: float, tokens_per_step: int,
           flops_per_token: float, peak: float | None, devices: int) -> dict:
    """A JSON-ready record from the step's (fetched) metrics and its wall time."""
    out = {"step": step, "loss": float(metrics["loss"])}
    for name, value in metrics.items():
        if name != "expert_load":
            out[name] = float(value) if name != "clipped_heads" else int(value)
    out.update(load_summary(metrics["expert_load"]))
    out["step_seconds"] = seconds
    out["tokens_per_second"] = tokens_per_step / seconds if seconds > 0 else None
    out["mfu"] = (tokens_per_step * flops_per_token / seconds / (peak * devices)
                  if peak and seconds > 0 else None)
    return out
