"""Sharding: the device mesh, the one table of logical-axis rules, and shardings derived from it.

Mesh axes are `MESH_AXES = ("data", "fsdp", "expert", "tensor")`; any may have size 1.

- data:   pure data parallelism; parameters replicated, batch split.
- fsdp:   batch split, and dense weights split along `embed` (gathered per layer by XLA);
          routed experts are split over it too, so fsdp x expert form the expert-parallel group.
- expert: batch split for attention, routed experts split along `E`; tokens travel to their
          experts with all-to-all (`k2jax.expert_parallel`). Expert weights are never gathered.
- tensor: attention heads, dense/shared/expert ffn width split (Megatron style); the vocab is
          split over tensor x fsdp.

API:
  MESH_AXES, RULES                      the axes and the one rules table (params and activations)
  parse_mesh_shape(spec) -> dict        "expert=8,tensor=2" or a dict -> sizes of all four axes
  MeshError                             a `ValueError` naming the mesh and what is wrong with it
  check_mesh(config, mesh)              raises `MeshError` where an axis cannot split the model
                                        dimensions the rules give it (never replicate silently)
  model_dims(config)                    those dimensions: (what, size, mesh axes)
  initialize_distributed(force=None)    `jax.distributed.initialize()` when asked or when the
                                        environment says this is one of several processes
  make_mesh(shape, devices=None)        a `Mesh` over all devices (topology-aware order)
  logical_spec(axes, mesh, *shapes)     logical names -> `PartitionSpec`, keeping only mesh axes
                                        that divide the dimension in every one of `shapes`
  (the parameter tree's specs and shardings, which need the model, are
   `k2jax.param_sharding`'s: this module sits below the model)
  batch_sharding(mesh, shape)           `[B, ...]` inputs (tokens, positions) split over batch
  cache_shardings(cache, mesh)          `LatentCache` leaves `[L, B, S, C]` split over batch
  activate(mesh)                        context manager: the mesh (`jax.set_mesh`) and `RULES`
                                        for `nn.with_logical_constraint`; also what makes the
                                        MoE layer run expert-parallel
  active_mesh()                         the current (abstract) mesh, or None
  describe(mesh), device_count(shape)   "expert=8,tensor=2" of a mesh; devices a shape needs
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from typing import Mapping

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# (logical name, mesh axes), in priority order: flax assigns each array dimension the first rule
# whose mesh axes are still free in that array. So `batch` (listed first) takes fsdp in
# activations `[B, T, D]` and `embed` falls back to unsharded there, while weights, which have no
# batch dimension, get `embed` split over fsdp. Routed experts take fsdp for `E`, which keeps
# their `embed` whole: splitting it would make every step gather the experts. The vocab takes
# fsdp too, so the embedding table's `embed` stays whole: a lookup from a table split on `embed`
# over the axis that also splits the tokens makes XLA replicate the looked-up activations.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("cache_length", None),
    ("expert", ("fsdp", "expert")),
    ("expert_mlp", "tensor"),
    ("vocab", ("tensor", "fsdp")),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("q_lora", None),
    ("kv_lora", None),
    ("router", None),
    ("norm", None),
    ("layers", None),
)

CACHE_AXES = ("layers", "batch", "cache_length", "kv_lora")


class MeshError(ValueError):
    """A mesh spec that is malformed or does not fit the model: `"mesh SPEC: REASON"`."""

    def __init__(self, mesh: str, reason: str):
        super().__init__(f"mesh {mesh}: {reason}")
        self.mesh, self.reason = mesh, reason


def _spec_text(spec) -> str:
    if isinstance(spec, str):
        return spec
    return ",".join(f"{a}={n}" for a, n in dict(spec or {}).items()) or "single"


def parse_mesh_shape(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """`"expert=8,tensor=2"` (or `{"expert": 8, "tensor": 2}`) -> sizes of all of `MESH_AXES`."""
    if spec is None or spec == "":
        sizes: dict[str, int] = {}
    elif isinstance(spec, str):
        sizes = {}
        for part in spec.split(","):
            m = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", part)
            if not m:
                raise MeshError(spec, "expected comma-separated axis=size, e.g. "
                                      "'expert=8,tensor=2'")
            if m.group(1) in sizes:
                raise MeshError(spec, f"axis {m.group(1)!r} given twice")
            sizes[m.group(1)] = int(m.group(2))
    else:
        sizes = dict(spec)
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise MeshError(_spec_text(spec),
                        f"axes {sorted(unknown)} unknown; the axes are {MESH_AXES}")
    bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or v < 1}
    if bad:
        raise MeshError(_spec_text(spec), f"axis sizes must be positive ints, got {bad}")
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def _mesh_sizes(mesh) -> dict[str, int]:
    """Sizes of all of `MESH_AXES` of a `Mesh`/`AbstractMesh` or a mesh spec."""
    if hasattr(mesh, "axis_names"):
        sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
        return {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    return parse_mesh_shape(mesh)


def _divisors(n: int, limit: int = 12) -> str:
    found = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, found[:limit])) + (", ..." if len(found) > limit else "")


def model_dims(config) -> list[tuple[str, int, tuple[str, ...]]]:
    """(what, size, mesh axes) of each model dimension `RULES` splits over mesh axes."""
    dims = []
    if config.num_moe_layers and config.n_routed_experts:
        dims.append(("routed experts", config.n_routed_experts, ("fsdp", "expert")))
        dims.append(("channels of each routed expert (moe_intermediate_size)",
                     config.moe_intermediate_size, ("tensor",)))
        if config.n_shared_experts:
            dims.append(("channels of the shared experts (moe_intermediate_size x "
                         "n_shared_experts)", config.shared_intermediate_size, ("tensor",)))
    dims.append(("attention heads", config.num_attention_heads, ("tensor",)))
    if config.num_dense_layers:
        dims.append(("channels of the dense MLP (intermediate_size)", config.intermediate_size,
                     ("tensor",)))
    dims.append(("vocabulary entries (vocab_size)", config.vocab_size, ("tensor", "fsdp")))
    dims.append(("hidden channels (hidden_size)", config.hidden_size, ("fsdp",)))
    return dims


def check_mesh(config, mesh) -> None:
    """Raises `MeshError` unless every mesh axis of size > 1 splits each model dimension the
    rules give it (routed experts over fsdp x expert; heads, MLP widths over tensor; vocab over
    tensor x fsdp; hidden over fsdp). Otherwise `logical_spec` would drop the axis there and
    replicate what the mesh was asked to split, e.g. turn expert parallelism off."""
    for what, count, axes in model_dims(config):
        check_split(mesh, what, count, axes)


def check_split(mesh, what: str, count: int, axes) -> None:
    """Raises `MeshError` unless the `axes` of `mesh` (those of size > 1) split `count` evenly."""
    sizes = _mesh_sizes(mesh)
    used = [a for a in axes if sizes[a] > 1]
    total = math.prod(sizes[a] for a in used)
    if count % total == 0:
        return
    name = (_spec_text(mesh) if mesh is None or isinstance(mesh, (str, Mapping))
            else ",".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "single")
    if len(used) == 1:
        alone = all(n == 1 for a, n in sizes.items() if a != used[0])
        over = f"{total} devices" if alone else f"{used[0]}={total}"
        hint = "a divisor"
    else:
        over = " x ".join(f"{a}={sizes[a]}" for a in used) + f" = {total} devices"
        hint = "sizes whose product is a divisor"
    raise MeshError(name, f"{count} {what} do not split evenly over {over}; use {hint} "
                          f"of {count} ({_divisors(count)})")


# A launch by hand (or by a test) names the coordinator and this process's place in the job:
#   JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=0..3
# SLURM, Open MPI and TPU pod slices are detected by jax itself.
NUM_PROCESSES_ENV, PROCESS_ID_ENV = "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _multi_process_env() -> bool:
    """Whether a launcher started several processes of this program (SLURM, MPI, TPU pods)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if int(env.get(key, "1") or 1) > 1:
            return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(force: bool | None = None) -> bool:
    """Starts `jax.distributed` (once, before any device is touched) when `force` is True or,
    with `force=None`, when the environment shows several processes. Returns whether it runs."""
    if jax.distributed.is_initialized():
        return True
    if force is False or (force is None and not _multi_process_env()):
        return False
    # CPU devices of different processes reach each other through gloo (the CPU backend has no
    # cross-process collectives otherwise); accelerators are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    explicit = {}
    if os.environ.get(NUM_PROCESSES_ENV) and os.environ.get(PROCESS_ID_ENV):
        try:
            explicit = {"num_processes": int(os.environ[NUM_PROCESSES_ENV]),
                        "process_id": int(os.environ[PROCESS_ID_ENV])}
        except ValueError:
            raise ValueError(f"{NUM_PROCESSES_ENV}={os.environ[NUM_PROCESSES_ENV]!r} and "
                             f"{PROCESS_ID_ENV}={os.environ[PROCESS_ID_ENV]!r} must be "
                             "integers") from None
    jax.distributed.initialize(**explicit)
    return True


def make_mesh(shape: str | Mapping[str, int] | None = None, devices=None,
              distributed: bool | None = None) -> Mesh:
    """A mesh with axes `MESH_AXES` over `devices` (all global devices by default).

    Unnamed axes have size 1. Devices are ordered by `jax.make_mesh`, which lays the trailing
    axes (tensor, then expert) over the closest devices of a TPU/GPU topology. Axes are `Auto`,
    so XLA propagates shardings between the constraints the model sets.
    """
    initialize_distributed(distributed)
    sizes = parse_mesh_shape(shape)
    devices = list(jax.devices() if devices is None else devices)
    total = math.prod(sizes.values())
    if total != len(devices):
        raise MeshError(_spec_text(shape) if shape else "single",
                        f"needs {total} devices, but {len(devices)} are available")
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _axis_size(mesh, name: str) -> int:
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1)


def logical_spec(axes, mesh, *shapes) -> PartitionSpec:
    """Logical axis names -> `PartitionSpec` on `mesh`, by `RULES`.

    With `shapes`, each dimension keeps (in order) only the mesh axes of size > 1 whose combined
    size divides that dimension in every shape, so any batch size or a `QuantizedWeight`'s
    coarser scale gets a valid, consistent spec instead of an error or padding.
    """
    spec = nn.logical_to_mesh_axes(tuple(axes), RULES)
    out = []
    for dim, entry in enumerate(spec):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        kept, size = [], 1
        for name in names:
            n = _axis_size(mesh, name)
            if n == 1 or name not in mesh.axis_names:
                continue
            if all(shape[dim] % (size * n) == 0 for shape in shapes):
                kept.append(name)
                size *= n
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def batch_sharding(mesh, shape) -> NamedSharding:
    """Sharding of a `[B, ...]` input: `B` over the batch axes that divide it."""
    return NamedSharding(mesh, logical_spec(("batch",) + (None,) * (len(shape) - 1), mesh, shape))


def cache_shardings(cache, mesh):
    """Shardings of a latent cache (dict of `LatentCache`, leaves `[L, B, S, C]` / `[L, B, S, R]`).

    Split over batch only: the latent is shared by all heads, so tensor parallelism keeps a
    full copy on each tensor rank (a property of MLA).
    """
    return jax.tree.map(lambda x: NamedSharding(mesh, logical_spec(CACHE_AXES, mesh, x.shape)),
                        cache)


@contextlib.contextmanager
def activate(mesh: Mesh):
    """Makes `mesh` the current mesh (`jax.set_mesh`) and `RULES` the logical-axis rules.

    Inside, `nn.with_logical_constraint` resolves against the mesh and the MoE layer dispatches
    tokens expert-parallel when the routed experts are split over it. Functions must be traced
    (first called) inside it: jit keys its cache on the mesh, not on the rules.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield mesh


def active_mesh():
    """The current mesh (an `AbstractMesh` while tracing), or None outside any mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def describe(mesh: Mesh) -> str:
    """`"expert=8,tensor=2"`: the axes of size > 1 (`"single"` for one device)."""
    parts = [f"{a}={n}" for a, n in zip(mesh.axis_names, mesh.axis_sizes) if n > 1]
    return ",".join(parts) or "single"


def device_count(shape: str | Mapping[str, int] | None) -> int:
    """Devices a mesh of `shape` needs."""
    return math.prod(parse_mesh_shape(shape).values())
