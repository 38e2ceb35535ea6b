"""k2jax checkpoint -> hub model directory (`k2jax convert --to hf`), streaming.

Writes `config.json` (`ModelConfig.to_hf()`, plus a compressed-tensors `quantization_config`
when the checkpoint holds INT4 `QuantizedWeight`s), `model-0000i-of-0000n.safetensors` shards
in hub naming (per-expert linears, `[out, in]`) and `model.safetensors.index.json`.

Tensors are read slice by slice from the Orbax arrays (`convert.store.open_for_reading`), a few
at a time on a thread pool, and appended in order to the open shard, whose header is computed
up front from the shapes alone, so memory stays near a few tensors. A bf16/f32 leaf is written
in its own dtype, an INT4 leaf as `weight_packed`/`weight_scale`/`weight_shape`: converting a
hub checkpoint in and back out reproduces every tensor byte for byte. The checkpoint's bundled
files (tokenizer, chat template, generation config, custom code: `convert.bundled_files`) are
copied unchanged. The directory is assembled in `OUT.partial` and renamed when complete; an
interrupted export starts over.

`config.json` must load in transformers. It knows `deepseek_v3` but not `kimi_k2`, which Moonshot
ships with custom code: an `auto_map` stored with the checkpoint is exported (model type kept)
when every file it names is bundled; otherwise the export says `model_type: deepseek_v3`,
the same architecture under the name transformers implements.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import numpy as np
from tqdm import tqdm

from convert import bundled_files, hf_layout, store
from convert.pipeline import ordered_map, thread_pool
from convert.reader import DTYPES, INDEX_FILE, ConversionError
from k2jax import quant
from k2jax.api import param_shapes
from k2jax.checkpoint import (CONFIG_FILE, PARAMS_DIR, check_stored_tree, read_config,
                              write_json_atomic)
from k2jax.config import ModelConfig

DEFAULT_SHARD_BYTES = 5 * 10**9
# Model types transformers implements itself (`AutoConfig` needs no remote code for them).
TRANSFORMERS_MODEL_TYPES = ("deepseek_v3",)

# compressed-tensors `ignore` entry that keeps each linear group out of INT4, in the order
# K2 Thinking's config.json lists them.
_IGNORE = {
    "lm_head": "lm_head",
    "attention": "re:.*self_attn.*",
    "shared_experts": "re:.*shared_experts.*",
    "dense_mlp": "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
    "routed_experts": "re:.*mlp\\.experts\\..*",
}


def quantization_config(config: ModelConfig) -> dict | None:
    """K2 Thinking's compressed-tensors `pack-quantized` config for `config.quantized_linears`."""
    if not config.quantized_linears:
        return None
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": config.quant_group_size, "dynamic": False, "actorder": None,
               "block_structure": None, "observer": "minmax", "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "quantization_status": "compressed", "kv_cache_scheme": None,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": None, "output_activations": None}},
        "ignore": [p for g, p in _IGNORE.items() if not config.is_quantized(g)],
    }


def hub_config(config: ModelConfig, auto_map: dict | None = None) -> dict:
    """The export's config.json; `auto_map`: the custom code it ships with, if any."""
    out = config.to_hf()
    if auto_map:
        out["auto_map"] = auto_map
    elif config.model_type not in TRANSFORMERS_MODEL_TYPES:
        out["model_type"] = "deepseek_v3"
    qc = quantization_config(config)
    if qc:
        out["quantization_config"] = qc
    return out


def shipped_auto_map(ckpt_dir: str) -> dict | None:
    """The checkpoint's stored `auto_map` if every code file it names is bundled, else None."""
    with open(os.path.join(ckpt_dir, CONFIG_FILE)) as f:
        auto_map = json.load(f).get("auto_map")
    if not auto_map:
        return None
    present = set(bundled_files.bundled_files(ckpt_dir))
    return auto_map if bundled_files.code_files(auto_map) <= present else None


def _shards(units, max_bytes: int) -> list[list[hf_layout.Item]]:
    """Items in hub order, cut into shards of at most `max_bytes` (an item is never split)."""
    shards, current, size = [], [], 0
    for item in (i for u in units for i in u.items):
        nbytes = sum(math.prod(s) * DTYPES[d].itemsize
                     for s, d in hf_layout.export_specs(item).values())
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    return shards + [current]


def _header(items) -> tuple[bytes, int]:
    """The safetensors header of a shard holding `items` (padded to 8 bytes) and its data size."""
    entries, offset = {}, 0
    for item in items:
        for name, (shape, dtype) in hf_layout.export_specs(item).items():
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            entries[name] = {"dtype": dtype, "shape": list(shape),
                             "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    entries["__metadata__"] = {"format": "pt"}
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offset


def _read_item(arrays, item: hf_layout.Item):
    def read(field=None):
        return arrays[store.leaf_name(item.leaf + ((field,) if field else ()))][
            item.index].read().result()

    if hf_layout.is_int4(item):
        return quant.QuantizedWeight(read("values"), read("scale"))
    return read()


def convert_to_hf(ckpt_dir, out_dir, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                  progress: bool = True) -> None:
    """Writes the k2jax checkpoint at `ckpt_dir` as a hub model directory at `out_dir`."""
    out = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out):
        raise ConversionError(f"{out} already exists")
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    config = read_config(ckpt_dir)
    params_dir = os.path.join(ckpt_dir, PARAMS_DIR)
    check_stored_tree(params_dir, param_shapes(config))
    arrays = store.open_for_reading(params_dir)
    units = hf_layout.plan(config, config)
    shards = _shards(units, max_shard_bytes)
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    weight_map, total = {}, 0

    def export(item):
        return item, hf_layout.to_hub(item, _read_item(arrays, item))

    with tqdm(total=sum(_header(s)[1] for s in shards), unit="B", unit_scale=True,
              unit_divisor=1024, disable=not progress, desc="export", file=sys.stderr,
              dynamic_ncols=True) as bar, thread_pool() as pool:
        for n, items in enumerate(shards, 1):
            file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            header, data_bytes = _header(items)
            with open(os.path.join(partial, file), "wb") as f:
                f.write(header)
                for item, tensors in ordered_map(pool, export, items):
                    for name, (shape, dtype) in hf_layout.export_specs(item).items():
                        array = tensors[name]
                        if array.shape != shape or array.dtype != DTYPES[dtype]:
                            raise ConversionError(f"{name}: checkpoint gives {array.dtype}"
                                                  f"{list(array.shape)}, expected {dtype}"
                                                  f"{list(shape)}")
                        f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
                        weight_map[name] = file
                        bar.update(array.nbytes)
            total += data_bytes
    write_json_atomic(os.path.join(partial, INDEX_FILE),
                      {"metadata": {"total_size": total}, "weight_map": weight_map})
    bundled_files.copy_bundled(ckpt_dir, partial)
    write_json_atomic(os.path.join(partial, CONFIG_FILE),
                      hub_config(config, shipped_auto_map(ckpt_dir)))
    os.rename(partial, out)
