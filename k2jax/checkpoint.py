"""Checkpoints: the parameter tree as an Orbax PyTree, with the `ModelConfig` beside it.

A checkpoint directory:

    PATH/config.json   `ModelConfig.to_hf()` (a hub config.json) plus the k2jax fields `dtype`,
                       `quantized_linears` and `quant_group_size` (and, converted, the hub's
                       `auto_map`). Written last: a directory without it is incomplete and
                       `load` refuses it.
    PATH/params/       an Orbax PyTree checkpoint of the parameter tree (layout in
                       `k2jax.model`): one tensorstore array per leaf, named by its '.'-joined
                       path, e.g. `moe_layers.mlp.experts.up_proj.kernel.values`
                       `[L_moe, E, in, out]` int4 and `...kernel.scale` `[L_moe, E, in/32, out]`.
    PATH/tiktoken.model, tokenizer_config.json, chat_template.jinja, generation_config.json,
    PATH/*.py, ...     a converted model's non-weight files, byte for byte as the hub directory
                       had them (`convert.bundled_files`); absent from a `save`d checkpoint.

`save` writes `params/` through Orbax's PyTree handler; `k2jax convert` writes the same tree layer
by layer as plain zarr3 arrays (`convert.store`). Either restores with stock Orbax, which
`load` uses: given a mesh or shardings, each host reads only the chunks of its own shards.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil

import jax

from k2jax.api import param_shapes
from k2jax.config import ModelConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# ModelConfig fields that a hub config.json cannot express; stored beside the hub keys.
K2JAX_FIELDS = ("dtype", "quantized_linears", "quant_group_size")


class CheckpointError(ValueError):
    """A path that is not a complete k2jax checkpoint, or one that does not match its config."""


def config_to_json(config: ModelConfig) -> dict:
    """The dict stored as `config.json`: hub keys plus the k2jax-only fields."""
    out = config.to_hf()
    out.update(dtype=config.dtype, quantized_linears=list(config.quantized_linears),
               quant_group_size=config.quant_group_size)
    return out


def config_from_json(data: dict) -> ModelConfig:
    """Inverse of `config_to_json`."""
    data = dict(data)
    extra = {k: data.pop(k) for k in K2JAX_FIELDS if k in data}
    missing = set(K2JAX_FIELDS) - set(extra)
    if missing:
        raise CheckpointError(f"config.json lacks the k2jax fields {sorted(missing)}; it is a "
                              "hub config, not a k2jax checkpoint's (run `k2jax convert`)")
    return ModelConfig.from_hf(data).replace(
        dtype=extra["dtype"], quantized_linears=tuple(extra["quantized_linears"]),
        quant_group_size=extra["quant_group_size"])


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of the checkpoint at `path`; refuses incomplete directories."""
    path = os.fspath(path)
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(os.path.join(path, PARAMS_DIR)) or not os.path.isfile(config_path):
        raise CheckpointError(_not_a_checkpoint(path))
    with open(config_path) as f:
        return config_from_json(json.load(f))


def _not_a_checkpoint(path: str) -> str:
    """Why `path` is not a checkpoint, and the command that makes one."""
    if not os.path.exists(path):
        if os.path.isdir(path + ".partial"):
            return (f"{path} does not exist yet: {path}.partial is an unfinished "
                    "`k2jax convert`; run the same command again to finish it")
        return f"{path}: no such directory"
    names = os.listdir(path) if os.path.isdir(path) else []
    if CONFIG_FILE in names and any(n.endswith(".safetensors") for n in names):
        return (f"{path} is a Hugging Face checkpoint, not an Orbax one: convert it first "
                f"with `k2jax convert {shlex.quote(path)} OUT` and pass OUT")
    return (f"{path}: not a complete k2jax checkpoint (needs {CONFIG_FILE} and {PARAMS_DIR}/; "
            "an interrupted `k2jax convert` finishes when run again)")


def save(path: str | os.PathLike, config: ModelConfig, params, files=()) -> None:
    """Writes `params` (the tree of `k2jax.param_shapes(config)`) and `config` to `path`,
    with copies of `files` (paths, e.g. the tokenizer's) beside `config.json`.

    The checkpoint is assembled in `path.partial` and renamed into place once complete.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists")
    check_tree(config, params, where=path)
    partial = path + ".partial"
    primary = jax.process_index() == 0
    if primary and os.path.exists(partial):
        shutil.rmtree(partial)  # a save that died half way
    _sync_hosts(f"k2jax.checkpoint.save:{path}:start")
    import orbax.checkpoint as ocp  # imported on use: it takes seconds, `import k2jax` not

    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_zarr3=True)) as ckptr:
        ckptr.save(os.path.join(partial, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
    if primary:
        for file in files:
            shutil.copyfile(file, os.path.join(partial, os.path.basename(file)))
        write_json_atomic(os.path.join(partial, CONFIG_FILE), config_to_json(config))
        os.rename(partial, path)
    _sync_hosts(f"k2jax.checkpoint.save:{path}:done")


def _sync_hosts(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def load(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, *, shardings=None):
    """Reads a checkpoint: returns `(config, params)`.

    Args:
      path: a directory written by `save` or `k2jax convert`.
      mesh: place every leaf with `k2jax.param_sharding`'s shardings on this mesh.
      shardings: a pytree of `jax.sharding.Sharding` matching the params (overrides `mesh`).
    With neither, every leaf lands on the default device. Each host reads only the chunks
    that its addressable shards cover.
    """
    path = os.path.abspath(os.fspath(path))
    config = read_config(path)
    abstract = param_shapes(config)
    params_dir = os.path.join(path, PARAMS_DIR)
    check_stored_tree(params_dir, abstract)
    if shardings is None:
        if mesh is not None:
            from k2jax import param_sharding

            shardings = param_sharding.param_shardings(config, mesh)
        else:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          abstract, shardings)
    import orbax.checkpoint as ocp

    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        params = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args))
    return config, params


def leaf_paths(tree) -> dict[tuple[str, ...], object]:
    """`{('moe_layers', 'mlp', ..., 'values'): leaf}`: tree paths as tuples of names."""
    def name(key):
        return str(getattr(key, "key", getattr(key, "name", key)))

    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(name(k) for k in path): leaf for path, leaf in flat}


def check_tree(config: ModelConfig, params, where: str) -> None:
    """Raises `CheckpointError` unless `params` has exactly the leaves, shapes and dtypes of
    `param_shapes(config)`."""
    _compare({p: (tuple(x.shape), str(x.dtype)) for p, x in leaf_paths(params).items()},
             param_shapes(config), where)


def check_stored_tree(params_dir: str, abstract) -> None:
    """Compares Orbax's metadata of `params_dir` with the abstract tree the config implies."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        stored = ckptr.metadata(params_dir).item_metadata.tree
    _compare({p: (tuple(m.shape), str(m.dtype)) for p, m in leaf_paths(stored).items()},
             abstract, params_dir)


def _compare(found: dict, abstract, where: str) -> None:
    want = {p: (tuple(s.shape), str(s.dtype)) for p, s in leaf_paths(abstract).items()}
    problems = [f"missing {'/'.join(p)}" for p in sorted(want.keys() - found.keys())]
    problems += [f"unexpected {'/'.join(p)}" for p in sorted(found.keys() - want.keys())]
    problems += [f"{'/'.join(p)} is {found[p][1]}{list(found[p][0])}, the config implies "
                 f"{want[p][1]}{list(want[p][0])}"
                 for p in sorted(want.keys() & found.keys()) if found[p] != want[p]]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{where}: parameters do not match config.json: "
                              + "; ".join(problems[:5]) + more)


def write_json_atomic(path: str, data) -> None:
    """Writes JSON to `path` via a temporary file and a rename, so readers see all or nothing."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
