"""Expert-parallel MoE against letting XLA partition the single-device MoE, same mesh, one run.

    python benchmarks/expert_parallel.py                # 8 simulated CPU devices, mesh expert=8
    python benchmarks/expert_parallel.py --mesh fsdp=2,expert=4 --tokens 2048

One MoE layer of the `small` preset (32 experts, top-4), forward and backward, on `--tokens`
tokens split over the batch axes. Four ways:
  expert-parallel   k2jax under `sharding.activate(mesh)`: all-to-all dispatch in shard_map,
                    dropless (worst-case buffers: P times the even share of rows)
  EP, capacity 1.25 the same with buffers of 1.25x the even share (overflow dropped)
  XLA-partitioned   the same sharded weights and tokens, single-device MoE code, no mesh
                    context: XLA's partitioner decides how to move experts or tokens
  one device        everything on device 0
Reported per device: median step time, compiled temporaries, collective bytes by kind (from the
compiled HLO). On a CPU host the devices share its cores, so times compare the programs' work,
not an interconnect; XLA:CPU's `ragged_dot` costs rows x groups, so padding rows cost as much as
real ones there (GPU/TPU grouped-matmul kernels skip them). `--write` saves
results/expert_parallel.json.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import _results  # noqa: E402  (benchmarks/_results.py)
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import k2jax  # noqa: E402
from k2jax import plan, sharding  # noqa: E402
from k2jax.moe import MoE  # noqa: E402


def moe_step(config):
    module = MoE(config)

    def loss(params, x_td):
        y, _, _ = module.apply({"params": params}, x_td[None])
        return jnp.mean(y.astype(jnp.float32) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def measure(fn, params, x, steps):
    compiled = fn.lower(params, x).compile()
    jax.block_until_ready(compiled(params, x))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - start)
    collectives = plan.collective_bytes(compiled.as_text())
    return {"step_ms": 1e3 * statistics.median(times),
            "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
            **{k: v for k, v in collectives.items() if k in ("all-to-all", "all-gather",
                                                             "all-reduce", "reduce-scatter")}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mesh", default="expert=8")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    _results.add_arguments(parser, "expert_parallel")
    args = parser.parse_args()

    config = k2jax.ModelConfig.preset("small").replace(dtype="float32")
    params = jax.tree.map(
        lambda p: p.unbox() if hasattr(p, "unbox") else p,
        MoE(config).init(jax.random.key(0), jnp.zeros((1, 1, config.hidden_size)))["params"],
        is_leaf=lambda p: hasattr(p, "unbox"))
    x = jax.random.normal(jax.random.key(1), (args.tokens, config.hidden_size))
    mesh = sharding.make_mesh(args.mesh)

    # One layer's slice of the stacked MoE parameters: their names without the `layers` axis.
    layer_axes = jax.tree.map(lambda names: names[1:],
                              k2jax.param_axes(config)["moe_layers"]["mlp"],
                              is_leaf=lambda n: isinstance(n, tuple))
    specs = jax.tree.map(lambda names, p: sharding.logical_spec(names, mesh, p.shape),
                         layer_axes, params, is_leaf=lambda n: isinstance(n, tuple))
    sharded = jax.device_put(params, jax.tree.map(lambda s: jax.NamedSharding(mesh, s), specs,
                                                  is_leaf=lambda s: isinstance(s, jax.P)))
    x_sharded = jax.device_put(x, sharding.batch_sharding(mesh, x.shape))

    rows = {}
    with sharding.activate(mesh):
        rows["expert-parallel"] = measure(moe_step(config), sharded, x_sharded, args.steps)
        rows["EP, capacity 1.25"] = measure(
            moe_step(config.replace(expert_capacity_factor=1.25)), sharded, x_sharded,
            args.steps)
    rows["XLA-partitioned"] = measure(moe_step(config), sharded, x_sharded, args.steps)
    rows["one device"] = measure(moe_step(config), params, x, args.steps)

    print(f"MoE layer of `small` (E={config.n_routed_experts}, K={config.num_experts_per_tok}), "
          f"{args.tokens} tokens, fwd+bwd, mesh {args.mesh}, {jax.devices()[0].platform}")
    cols = ("step_ms", "temp_bytes", "all-to-all", "all-gather", "all-reduce", "reduce-scatter")
    print(f"{'':<18}" + "".join(f"{c:>16}" for c in cols))
    for name, row in rows.items():
        cells = [f"{row['step_ms']:.1f}"] + [f"{row.get(c, 0) / 2**20:.1f} MiB" for c in cols[1:]]
        print(f"{name:<18}" + "".join(f"{c:>16}" for c in cells))
    _results.write(args, "expert_parallel", {"mesh": args.mesh, "tokens": args.tokens,
                                             "rows": rows})


if __name__ == "__main__":
    main()
