"""Train-step throughput on the `small` preset: k2jax's jitted QAT step against HF transformers'
DeepseekV3ForCausalLM with torch AdamW, same batch, same machine, in one run.

    python benchmarks/train_step.py      # prints a table; --write saves results/train_step.json
    python benchmarks/train_step.py --batch 4 --seq 256 --steps 10

Both sides do a full optimizer step on `batch x seq` random tokens: forward, next-token cross
entropy, backward, global-norm clipping at 1.0, AdamW. k2jax additionally fake-quantizes the
routed experts (INT4 QAT, as for K2 Thinking) and updates the router biases; HF trains plain
weights. Compute dtype is float32 on CPU (where neither side has fast bf16 matmuls) and bfloat16
on accelerators (torch autocast for HF); master weights and optimizer state are float32 on both
sides. Times are the
median of `--steps` steps after one warm-up step; MFU is reported where the accelerator's peak
is known (not on CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import _results  # benchmarks/_results.py, beside this script

import jax
import numpy as np

import k2jax
from k2jax import sharding
from train import metrics, optimizer, qat, step as step_lib
from train import mesh as train_mesh
from train.config import TrainConfig


def bench_k2jax(config, cfg: TrainConfig, tokens: np.ndarray, steps: int) -> dict:
    model_config = config.replace(quantized_linears=(), dtype=cfg.compute_dtype)
    mesh = train_mesh.build_mesh(None)
    tx = optimizer.make_optimizer(cfg)
    master = qat.master_params(k2jax.init_params(model_config, jax.random.key(0)))
    trainable = optimizer.trainable_paths(master, cfg.trainable)
    state = step_lib.init_state(master, tx, trainable)
    b, t = tokens.shape[0], tokens.shape[1] - 1
    batch = {"tokens": tokens[None, :, :-1], "targets": tokens[None, :, 1:],
             "weights": np.ones((1, b, t), np.float32),
             "segment_ids": np.ones((1, b, t), np.int32),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (1, b, t)).copy()}
    fn = step_lib.make_step(model_config, cfg, ("routed_experts",), trainable, tx)
    with sharding.activate(mesh):
        jitted, state_sh, batch_sh = step_lib.jit_step(fn, state, batch, model_config, mesh)
        state = jax.device_put(state, state_sh)
        batch = train_mesh.put_batch(batch, batch_sh)
        began = time.perf_counter()
        compiled = jitted.lower(state, batch).compile()
        compile_s = time.perf_counter() - began
        times = []
        for _ in range(steps + 1):
            began = time.perf_counter()
            state, out = compiled(state, batch)
            float(out["loss"])
            times.append(time.perf_counter() - began)
    return {"step_s": statistics.median(times[1:]), "compile_s": compile_s,
            "loss": float(out["loss"])}


def bench_hf(config, dtype: str, tokens: np.ndarray, steps: int, lr: float) -> dict:
    """HF's model in float32 (the master weights), under bf16 autocast off CPU."""
    import contextlib

    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    device = "cuda" if dtype != "float32" and torch.cuda.is_available() else "cpu"
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**config.to_hf())).float().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.as_tensor(tokens, dtype=torch.long, device=device)
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if dtype != "float32"
                else contextlib.nullcontext())
    times = []
    for _ in range(steps + 1):
        began = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return {"step_s": statistics.median(times[1:]), "loss": loss.item(),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    _results.add_arguments(parser, "train_step")
    args = parser.parse_args()

    on_cpu = jax.devices()[0].platform == "cpu"
    dtype = "float32" if on_cpu else "bfloat16"
    config = k2jax.ModelConfig.preset(args.preset)
    cfg = TrainConfig(data="-", out="-", preset=args.preset, batch_size=args.batch,
                      seq_len=args.seq, compute_dtype=dtype, learning_rate=1e-4,
                      warmup_steps=0, qat_groups=("routed_experts",))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size,
                                               (args.batch, args.seq + 1)).astype(np.int32)
    tokens_per_step = args.batch * args.seq
    flops = metrics.train_flops_per_token(config, args.seq) * tokens_per_step
    peak = metrics.peak_flops()

    rows = {"k2jax (jit, QAT experts)": bench_k2jax(config, cfg, tokens, args.steps)}
    if not args.skip_hf:
        rows["HF transformers (torch)"] = bench_hf(config, dtype, tokens[:, :-1], args.steps,
                                                   cfg.learning_rate)
    for row in rows.values():
        row["tokens_per_s"] = tokens_per_step / row["step_s"]
        row["mfu"] = flops / row["step_s"] / peak if peak else None

    print(f"train step, preset {args.preset}, batch {args.batch} x seq {args.seq}, {dtype} "
          f"compute, {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs)")
    print(f"{'':<26}{'step s':>9}{'tokens/s':>11}{'compile s':>11}{'MFU':>8}")
    for name, row in rows.items():
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
        compile_s = f"{row['compile_s']:.1f}" if "compile_s" in row else "-"
        print(f"{name:<26}{row['step_s']:>9.3f}{row['tokens_per_s']:>11.1f}{compile_s:>11}"
              f"{mfu:>8}")
    _results.write(args, "train_step", {
        "preset": args.preset, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "dtype": dtype, "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
        "jax": jax.__version__, "train_flops_per_step": flops, "peak_flops": peak,
        "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
