"""Paged (block) latent cache: memory follows the live tokens, not batch x max_len.

One pool of fixed-size pages per layer stack holds absorbed-MLA entries (`c_kv [C]` and the
rotated `k_pe [R]` per token) for every sequence; a sequence owns a list of pages, its row of
the page table. `PagedLatentCache` implements the `write`/`read` protocol of
`k2jax.attention.LatentCache`, so the model runs on it unchanged. `PageAllocator` is the host
side: free list, reference counts, and an index of full prompt pages so that sequences with an
identical prompt prefix share its pages instead of recomputing them.

The layout lives in `serve` because only serving uses it; the model sees only the protocol.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp

from k2jax.attention import to_storage
from k2jax.config import ModelConfig

STACKS = (("dense_layers", "num_dense_layers"), ("moe_layers", "num_moe_layers"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedLatentCache:
    """Pages of one layer stack and the page table of the batch.

    ckv: `[L, num_pages, page_size, C]`, kpe: `[L, num_pages, page_size, R]`.
    page_table: int32 `[B, pages_per_seq]`: the page holding positions
      `[i * page_size, (i + 1) * page_size)` of row b; entries >= num_pages are unallocated.

    A layer writes only its new slots and reads only its rows' pages: a step's cost follows the
    live tokens, not the size of the pool. Positions outside a row's allocated pages (padding
    uses -1) are dropped on write; unallocated pages read as zeros, which the causal mask never
    attends to.
    """

    ckv: jax.Array
    kpe: jax.Array
    page_table: jax.Array

    def write(self, layer, positions_bt, ckv_btc, kpe_btr) -> "PagedLatentCache":
        """Stores one layer's entries in the pages of their positions."""
        num_pages, page_size = self.ckv.shape[1:3]
        width = self.page_table.shape[-1]
        index_bt = positions_bt // page_size
        page_bt = jnp.take_along_axis(self.page_table, jnp.clip(index_bt, 0, width - 1), axis=1)
        valid_bt = (positions_bt >= 0) & (index_bt < width) & (page_bt < num_pages)
        page_bt = jnp.where(valid_bt, page_bt, num_pages)  # out of range: dropped

        def put(pages, new_btx):
            return pages.at[layer, page_bt, positions_bt % page_size].set(
                to_storage(new_btx, pages.dtype), mode="drop")

        return PagedLatentCache(put(self.ckv, ckv_btc), put(self.kpe, kpe_btr), self.page_table)

    def read(self, layer):
        """One layer's `(ckv [B, S, C], kpe [B, S, R], kv_positions [B, S])`, slot s holding
        position s, S = pages_per_seq x page_size."""
        batch, width = self.page_table.shape
        num_pages = self.ckv.shape[1]
        allocated_bw11 = (self.page_table < num_pages)[..., None, None]
        table_bw = jnp.minimum(self.page_table, num_pages - 1)

        def gather(pages):
            # One clipped gather along the flattened (layer, page) axis: indexing both axes
            # makes XLA:CPU copy the whole pool (written in place by the layer) every call.
            flat = pages.reshape(-1, *pages.shape[2:])
            rows = jnp.where(allocated_bw11, jnp.take(flat, layer * num_pages + table_bw,
                                                      axis=0, mode="clip"), 0)
            return rows.reshape(batch, width * pages.shape[2], pages.shape[-1])

        ckv_bsc, kpe_bsr = gather(self.ckv), gather(self.kpe)
        kv_pos_bs = jnp.broadcast_to(jnp.arange(ckv_bsc.shape[1]), ckv_bsc.shape[:2])
        return ckv_bsc, kpe_bsr, kv_pos_bs


def init_pages(config: ModelConfig, num_pages: int, page_size: int, dtype=jnp.bfloat16):
    """Empty pools, `{stack: (ckv [L, num_pages, page_size, C], kpe [..., R])}`."""
    pools = {}
    for stack, count_attr in STACKS:
        count = getattr(config, count_attr)
        if count:
            pools[stack] = (
                jnp.zeros((count, num_pages, page_size, config.kv_lora_rank), dtype),
                jnp.zeros((count, num_pages, page_size, config.qk_rope_head_dim), dtype))
    return pools


def with_page_table(pools, page_table_bw):
    """The model's cache argument: each stack's pools with the batch's page table."""
    return {stack: PagedLatentCache(ckv, kpe, page_table_bw)
            for stack, (ckv, kpe) in pools.items()}


def pools_of(cache):
    """Inverse of `with_page_table`: the updated pools of the model's returned cache."""
    return {stack: (c.ckv, c.kpe) for stack, c in cache.items()}


def bytes_per_token_per_layer(pools) -> int:
    """Cache bytes one token takes in one layer (the same for every stack)."""
    sizes = {ckv.shape[-1] * ckv.dtype.itemsize + kpe.shape[-1] * kpe.dtype.itemsize
             for ckv, kpe in pools.values()}
    (size,) = sizes
    return size


class PageAllocator:
    """Host-side bookkeeping of a pool of `num_pages` pages of `page_size` tokens.

    Full prompt pages can be indexed by their content (`register_prefix`) and found again by
    later sequences (`match_prefix`). An index key is (parent page, its generation, the page's
    tokens): a page is only found under the exact chain of pages before it, and reusing a page
    for other content bumps its generation, so stale children are never matched. Unreferenced
    indexed pages stay cached, least recently released evicted first, until the memory is needed.
    """

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_pages
        self._generation = [0] * num_pages
        self._index: dict[tuple, int] = {}
        self._key_of: dict[int, tuple] = {}
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()

    @property
    def num_free(self) -> int:
        """Pages that `allocate` can hand out (free or cached and unreferenced)."""
        return len(self._free) + len(self._cached)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, count: int) -> list[int] | None:
        """`count` pages with one reference each, or None (and nothing taken) if too few."""
        if count > self.num_free:
            return None
        pages = []
        for _ in range(count):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._cached.popitem(last=False)
                del self._index[self._key_of.pop(page)]
                self._generation[page] += 1
            self._refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: list[int]) -> None:
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._cached[page] = None
                else:
                    self._free.append(page)

    def _key(self, parent: int, tokens) -> tuple:
        return parent, (self._generation[parent] if parent >= 0 else 0), tuple(tokens)

    def match_prefix(self, tokens, max_tokens: int) -> list[int]:
        """Indexed pages holding the longest whole-page prefix of `tokens` no longer than
        `max_tokens`; each gets a reference (release them like allocated pages)."""
        pages, parent, size = [], -1, self.page_size
        for start in range(0, max_tokens - size + 1, size):
            page = self._index.get(self._key(parent, tokens[start:start + size]))
            if page is None:
                break
            pages.append(page)
            parent = page
        for page in pages:
            self._cached.pop(page, None)
            self._refs[page] += 1
        return pages

    def register_prefix(self, tokens, pages: list[int]) -> None:
        """Indexes the full pages of `tokens`, already written to `pages`, for sharing."""
        parent, size = -1, self.page_size
        for i in range(len(tokens) // size):
            key = self._key(parent, tokens[i * size:(i + 1) * size])
            owner = self._index.setdefault(key, pages[i])
            if owner != pages[i]:
                break  # another sequence indexed this prefix first; keep its chain
            self._key_of[pages[i]] = key
            parent = pages[i]

    def refcount(self, page: int) -> int:
        return self._refs[page]
