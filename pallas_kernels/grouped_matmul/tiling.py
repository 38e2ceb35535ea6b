"""Work list of the grouped matmul: which `(expert, row tile)` pairs a kernel visits.

Rows `[M]` are sorted by expert with `group_sizes [E]` summing to at most M; rows past the sum
form one more group, the "tail" (index E), whose output is zeros. Rows are cut into tiles of
`block_m`; a work item is one (group, tile) pair where the group has rows in the tile, so a tile
straddling a group boundary is visited once per group, each visit writing only its own rows,
and an empty group has no items. Every output row belongs to exactly one group and is
written by exactly one item.

With T tiles there are at most `T + min(E, M)` items (each non-empty group after the first
adds at most one tile visit); the list has that static length, and the `num_items..` padding
repeats the last real item, which kernels skip.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WorkList:
    """int32 arrays: `group_ids [W]`, `tile_ids [W]`, `num_items [1]`, and per group (the tail
    group E included) `group_starts [E+1]`, `group_ends [E+1]` in rows."""

    group_ids: jax.Array
    tile_ids: jax.Array
    num_items: jax.Array
    group_starts: jax.Array
    group_ends: jax.Array


def max_items(num_rows: int, num_experts: int, block_m: int) -> int:
    """The static length W of the work list."""
    return pl.cdiv(num_rows, block_m) + min(num_experts, num_rows)


@functools.partial(jax.jit, static_argnums=(1, 2))
def work_list(group_sizes_e: jax.Array, num_rows: int, block_m: int) -> WorkList:
    """Builds the work list for `num_rows` rows in tiles of `block_m` (see the module doc)."""
    num_experts = group_sizes_e.shape[0]
    sizes = group_sizes_e.astype(jnp.int32)
    tail = jnp.maximum(num_rows - jnp.sum(sizes), 0)
    sizes = jnp.concatenate([sizes, tail[None]])
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first_tile = starts // block_m
    tiles_per_group = jnp.where(sizes > 0, (ends - 1) // block_m - first_tile + 1, 0)
    items_end = jnp.cumsum(tiles_per_group)
    num_items = items_end[-1]

    item = jnp.minimum(jnp.arange(max_items(num_rows, num_experts, block_m)), num_items - 1)
    group_ids = jnp.searchsorted(items_end, item, side="right").astype(jnp.int32)
    first_item = items_end[group_ids] - tiles_per_group[group_ids]
    tile_ids = first_tile[group_ids] + item - first_item
    return WorkList(group_ids, tile_ids.astype(jnp.int32), num_items[None].astype(jnp.int32),
                    starts.astype(jnp.int32), ends.astype(jnp.int32))
