"""Paged (block) latent cache: memory follows the live tokens, not batch x max_len.

One pool of fixed-size pages per layer stack holds absorbed-MLA entries (`c_kv [C]` and the
rotated `k_pe [R]` per token) for every sequence; a sequence owns a list of pages, its row of
the page table. `PagedLatentCache` implements the `write`/`read` protocol of
`k2jax.attention.LatentCache`, so the model runs on it unchanged. `PageAllocator` is the host
side: free list, reference counts, and an index of full prompt pages so that sequences with an
identical prompt prefix share its pages instead of recomputing them.

On a device mesh the pool is split by pages over every device, each with the batch rows whose
sequences own those pages (`pool_axes` says why), and the allocator keeps one shard per device.

The layout lives in `serve` because only serving uses it; the model sees only the protocol.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k2jax.attention import to_storage
from k2jax.config import ModelConfig
from pallas_kernels.attention import paged

PAGES, ROWS = "pages", "rows"  # what a per-shard output is split by


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedLatentCache:
    """Pages of one layer stack and the page table of the batch.

    ckv: `[L, num_pages, page_size, C]`, kpe: `[L, num_pages, page_size, R]`.
    page_table: int32 `[B, pages_per_seq]`: the page holding positions
      `[i * page_size, (i + 1) * page_size)` of row b; entries >= num_pages are unallocated.
    mesh: None, or the mesh whose every device holds `num_pages / P` of the pages and the rows
      `B / P` that use them (P = `mesh.size`, see `pool_axes`); the table then holds page ids
      local to the row's shard.

    A layer writes only its new slots and reads only its rows' pages: a step's cost follows the
    live tokens, not the size of the pool. Positions outside a row's allocated pages (padding
    uses -1) are dropped on write; unallocated pages read as zeros at positions no query sees.
    """

    ckv: jax.Array
    kpe: jax.Array
    page_table: jax.Array
    mesh: Mesh | None = dataclasses.field(default=None, metadata=dict(static=True))

    def _per_shard(self, fn, layer, *row_args, out_specs):
        """`fn(ckv, kpe, table, layer, *row_args)` on each device's pages and rows; `out_specs`
        says which outputs are pages and which rows (`PAGES`, `ROWS`)."""
        if self.mesh is None:
            return fn(self.ckv, self.kpe, self.page_table, layer, *row_args)
        spec = {PAGES: PartitionSpec(None, pool_axes(self.mesh)),
                ROWS: PartitionSpec(pool_axes(self.mesh))}
        return jax.shard_map(
            fn, mesh=self.mesh,
            in_specs=(spec[PAGES], spec[PAGES], spec[ROWS], PartitionSpec()) +
            (spec[ROWS],) * len(row_args),
            out_specs=jax.tree.map(spec.get, out_specs))(
            self.ckv, self.kpe, self.page_table, jnp.asarray(layer, jnp.int32), *row_args)

    def write(self, layer, positions_bt, ckv_btc, kpe_btr) -> "PagedLatentCache":
        """Stores one layer's entries in the pages of their positions."""
        ckv, kpe = self._per_shard(_write_pages, layer, positions_bt, ckv_btc, kpe_btr,
                                   out_specs=(PAGES, PAGES))
        return PagedLatentCache(ckv, kpe, self.page_table, self.mesh)

    def read(self, layer):
        """One layer's `(ckv [B, S, C], kpe [B, S, R], kv_positions [B, S])`, slot s holding
        position s, S = pages_per_seq x page_size."""
        return self._per_shard(_read_pages, layer, out_specs=(ROWS, ROWS, ROWS))

    def attend(self, layer, q_latent_btnc, q_pe_btnr, q_pos_bt, *, scale: float):
        """Absorbed attention of one layer over each row's pages, read where they lie (the
        Pallas kernel on GPU/TPU; XLA gathers them): `[B, T, N, C]`."""
        def per_shard(ckv, kpe, table, layer, q_latent, q_pe, q_pos):
            return paged.paged_latent_attention(q_latent, q_pe, ckv, kpe, table, layer, q_pos,
                                                scale=scale)

        return self._per_shard(per_shard, layer, q_latent_btnc, q_pe_btnr, q_pos_bt,
                               out_specs=ROWS)


def pool_axes(mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes the pages and the batch rows are split over: all of them.

    MLA's latent is one `[C + R]` vector per token shared by every head, so a tensor axis that
    splits heads would each hold a full copy of any cache split on batch only. Instead every
    device owns its own slice of the pages together with the rows (sequences) that use them,
    DP-attention style: cache memory per device is the pool divided by the mesh size, and each
    row reads only pages on its own device. The attention for a row then runs where its pages
    lie; XLA moves the (small) per-row latents to the tensor ranks that hold the row's heads.
    """
    return tuple(mesh.axis_names)


def _write_pages(ckv, kpe, page_table, layer, positions_bt, ckv_btc, kpe_btr):
    num_pages, page_size = ckv.shape[1:3]
    width = page_table.shape[-1]
    index_bt = positions_bt // page_size
    page_bt = jnp.take_along_axis(page_table, jnp.clip(index_bt, 0, width - 1), axis=1)
    valid_bt = (positions_bt >= 0) & (index_bt < width) & (page_bt < num_pages)
    page_bt = jnp.where(valid_bt, page_bt, num_pages)  # out of range: dropped

    def put(pages, new_btx):
        return pages.at[layer, page_bt, positions_bt % page_size].set(
            to_storage(new_btx, pages.dtype), mode="drop")

    return put(ckv, ckv_btc), put(kpe, kpe_btr)


def _read_pages(ckv, kpe, page_table, layer):
    num_pages, page_size = ckv.shape[1:3]
    return (paged.gather_pages(ckv, page_table, layer), paged.gather_pages(kpe, page_table, layer),
            paged.key_positions(page_table, num_pages, page_size))


def init_pages(config: ModelConfig, num_pages: int, page_size: int, dtype=jnp.bfloat16,
               mesh: Mesh | None = None):
    """Empty pools, `{stack: (ckv [L, num_pages, page_size, C], kpe [..., R])}`; with `mesh`,
    each device allocates only its `num_pages / mesh.size` pages (`pool_sharding`)."""
    if mesh is not None and num_pages % mesh.size:
        raise ValueError(f"num_pages={num_pages} does not split over the {mesh.size} devices "
                         "of the mesh")
    device = None if mesh is None else pool_sharding(mesh)
    pools = {}
    for stack, count, _ in config.layer_stacks:
        pools[stack] = (
            jnp.zeros((count, num_pages, page_size, config.kv_lora_rank), dtype, device=device),
            jnp.zeros((count, num_pages, page_size, config.qk_rope_head_dim), dtype,
                      device=device))
    return pools


def pool_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a pool `[L, num_pages, page_size, X]`: pages over `pool_axes`."""
    return NamedSharding(mesh, PartitionSpec(None, pool_axes(mesh)))


def rows_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a per-row input `[B, ...]` (tokens, positions, page table): rows over
    `pool_axes`, row block k on the device that holds page shard k."""
    return NamedSharding(mesh, PartitionSpec(pool_axes(mesh)))


def with_page_table(pools, page_table_bw, mesh: Mesh | None = None):
    """The model's cache argument: each stack's pools with the batch's page table."""
    return {stack: PagedLatentCache(ckv, kpe, page_table_bw, mesh)
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


class _ShardPages:
    """One shard of a `PageAllocator`: `num_pages` pages of `page_size` tokens, local ids."""

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

    def indexed_prefix(self, tokens, max_tokens: int) -> list[int]:
        """Indexed pages holding the longest whole-page prefix of `tokens` no longer than
        `max_tokens` (no references taken)."""
        pages, parent, size = [], -1, self.page_size
        for start in range(0, max_tokens - size + 1, size):
            page = self._index.get(self._key(parent, tokens[start:start + size]))
            if page is None:
                break
            pages.append(page)
            parent = page
        return pages

    def match_prefix(self, tokens, max_tokens: int) -> list[int]:
        """`indexed_prefix`, each page given a reference (release them like allocated
        pages)."""
        pages = self.indexed_prefix(tokens, max_tokens)
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


class PageAllocator:
    """Host-side bookkeeping of a pool of `num_pages` pages of `page_size` tokens, split into
    `num_shards` equal shards (one per device of a mesh, `pool_axes`): shard k owns the page ids
    `[k * pages_per_shard, (k + 1) * pages_per_shard)`, and a sequence takes all its pages from
    one shard.

    Full prompt pages can be indexed by their content (`register_prefix`) and found again by
    later sequences of the same shard (`match_prefix`). An index key is (parent page, its
    generation, the page's tokens): a page is only found under the exact chain of pages before
    it, and reusing a page for other content bumps its generation, so stale children are never
    matched. Unreferenced indexed pages stay cached, least recently released evicted first,
    until the memory is needed. Page ids are global; `local` turns them into the ids a shard's
    device indexes.
    """

    def __init__(self, num_pages: int, page_size: int, num_shards: int = 1):
        if num_pages % num_shards:
            raise ValueError(f"num_pages={num_pages} does not split into {num_shards} shards")
        self.num_pages, self.page_size, self.num_shards = num_pages, page_size, num_shards
        self.pages_per_shard = num_pages // num_shards
        self._shards = [_ShardPages(self.pages_per_shard, page_size) for _ in range(num_shards)]

    @property
    def num_free(self) -> int:
        """Pages that `allocate` can hand out (free or cached and unreferenced), all shards."""
        return sum(shard.num_free for shard in self._shards)

    def free_in(self, shard: int) -> int:
        return self._shards[shard].num_free

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def shard_of(self, page: int) -> int:
        return page // self.pages_per_shard

    def local(self, pages: list[int]) -> list[int]:
        """Ids within their shard, as the shard's device indexes its slice of the pool."""
        return [page % self.pages_per_shard for page in pages]

    def _global(self, shard: int, pages: list[int]) -> list[int]:
        return [shard * self.pages_per_shard + page for page in pages]

    def allocate(self, count: int, shard: int = 0) -> list[int] | None:
        """`count` pages of `shard` with one reference each, or None (and nothing taken) if
        too few."""
        pages = self._shards[shard].allocate(count)
        return None if pages is None else self._global(shard, pages)

    def release(self, pages: list[int]) -> None:
        for page in pages:
            self._shards[self.shard_of(page)].release(self.local([page]))

    def indexed_prefix_len(self, tokens, max_tokens: int, shard: int = 0) -> int:
        """Pages of `tokens`' prefix that `match_prefix` would find in `shard`."""
        return len(self._shards[shard].indexed_prefix(tokens, max_tokens))

    def match_prefix(self, tokens, max_tokens: int, shard: int = 0) -> list[int]:
        """Indexed pages of `shard` holding the longest whole-page prefix of `tokens` no longer
        than `max_tokens`; each gets a reference (release them like allocated pages)."""
        return self._global(shard, self._shards[shard].match_prefix(tokens, max_tokens))

    def register_prefix(self, tokens, pages: list[int]) -> None:
        """Indexes the full pages of `tokens`, already written to `pages` (of one shard), for
        sharing."""
        if pages:
            self._shards[self.shard_of(pages[0])].register_prefix(tokens, self.local(pages))

    def refcount(self, page: int) -> int:
        return self._shards[self.shard_of(page)].refcount(self.local([page])[0])
