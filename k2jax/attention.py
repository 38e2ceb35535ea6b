"""Multi-head latent attention (MLA) in its two equal forms.

Expanded (training, cache-less forward): the latent `c_kv` is up-projected by `kv_b_proj` into
per-head keys and values, then ordinary attention. Absorbed (decode with a cache): `kv_b_proj`'s
key half is folded into the query and its value half applied after attention, so keys and values
are never materialised and the cache holds only `c_kv [C]` and the roped shared key `k_pe [R]`
per token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax import quant, rotary
from k2jax.config import ModelConfig
from k2jax.layers import Linear, RMSNorm
from pallas_kernels.attention import attention, blockwise, latent_attention

def to_storage(x, dtype):
    """Casts cache entries to their storage dtype; 8-bit floats saturate instead of turning
    out-of-range values into NaN."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 1:
        limit = float(jnp.finfo(dtype).max)
        x = jnp.clip(x.astype(jnp.float32), -limit, limit)
    return x.astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentCache:
    """Contiguous absorbed-MLA cache of one stack of layers.

    ckv: `[L, B, S, C]` normalised KV latent. kpe: `[L, B, S, R]` rotated shared rope key.
    Slot `s` of row `b` holds the token at position `s`.

    A cache layout is anything with `write(layer, ...)`, `read(layer)` and
    `attend(layer, ...)` (a paged one plugs in the same way). The whole stack rides in the layer
    scan's carry, each layer writing its slots in place and then attending over its rows
    (`LayerCache`); scanned over instead, the cache would be sliced and restacked, copied whole
    on every call.
    """

    ckv: jax.Array
    kpe: jax.Array

    def write(self, layer, positions_bt, ckv_btc, kpe_btr) -> "LatentCache":
        """Stores one layer's entries at their positions (out-of-range positions dropped)."""
        slots_bt = jnp.where(positions_bt >= 0, positions_bt, self.ckv.shape[2])
        rows = jnp.arange(self.ckv.shape[1])[:, None]
        return LatentCache(
            self.ckv.at[layer, rows, slots_bt].set(to_storage(ckv_btc, self.ckv.dtype),
                                                   mode="drop"),
            self.kpe.at[layer, rows, slots_bt].set(to_storage(kpe_btr, self.kpe.dtype),
                                                   mode="drop"))

    def read(self, layer):
        """`(ckv [B, S, C], kpe [B, S, R], kv_positions [B, S])` of one layer."""
        ckv_bsc, kpe_bsr = self.ckv[layer], self.kpe[layer]
        kv_pos_bs = jnp.broadcast_to(jnp.arange(ckv_bsc.shape[1]), ckv_bsc.shape[:2])
        return ckv_bsc, kpe_bsr, kv_pos_bs

    def attend(self, layer, q_latent_btnc, q_pe_btnr, q_pos_bt, *, scale: float):
        """Absorbed attention of one layer's queries over its cached rows: `[B, T, N, C]`."""
        ckv_bsc, kpe_bsr, kv_pos_bs = self.read(layer)
        return latent_attention(q_latent_btnc, q_pe_btnr, ckv_bsc, kpe_bsr, q_pos_bt,
                                kv_pos_bs, scale=scale)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's view of a stack's cache (any layout) inside the layer scan."""

    stack: Any
    layer: jax.Array

    def write(self, positions_bt, ckv_btc, kpe_btr) -> "LayerCache":
        return LayerCache(self.stack.write(self.layer, positions_bt, ckv_btc, kpe_btr),
                          self.layer)

    def read(self):
        return self.stack.read(self.layer)

    def attend(self, q_latent_btnc, q_pe_btnr, q_pos_bt, *, scale: float):
        return self.stack.attend(self.layer, q_latent_btnc, q_pe_btnr, q_pos_bt, scale=scale)


class MLAttention(nn.Module):
    """MLA block: `x [B, T, D] -> [B, T, D]` (plus the updated layer cache when given one)."""

    config: ModelConfig
    serving_layout: bool = False  # kv_b_proj's float kernel stored [out, in] (k2jax.model)
    # Also return each head's largest pre-softmax logit (softmax scale included) over the
    # batch, `[N]` float32, not differentiated: what QK-clip reads (cache-less form only).
    max_logits: bool = False

    def setup(self):
        cfg = self.config
        d, n, h, r, u = (cfg.hidden_size, cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                      cfg.v_head_dim)
        dtype = jnp.dtype(cfg.dtype)
        linear = lambda in_features, features, axes, **kw: Linear(  # noqa: E731
            in_features, features, axes, dtype=dtype, param_dtype=dtype,
            quantized=cfg.is_quantized("attention"),
            group_size=cfg.quant_group_size, init_std=cfg.initializer_range, **kw)
        norm = lambda: RMSNorm(cfg.rms_norm_eps, dtype=dtype, param_dtype=dtype)  # noqa: E731
        if cfg.q_lora_rank:
            self.q_a_proj = linear(d, cfg.q_lora_rank, ("embed", "q_lora"))
            self.q_a_layernorm = norm()
            self.q_b_proj = linear(cfg.q_lora_rank, n * (h + r), ("q_lora", "heads"))
        else:
            self.q_proj = linear(d, n * (h + r), ("embed", "heads"))
        self.kv_a_proj_with_mqa = linear(d, cfg.kv_lora_rank + r, ("embed", "kv_lora"))
        self.kv_a_layernorm = norm()
        self.kv_b_proj = linear(cfg.kv_lora_rank, n * (h + u), ("kv_lora", "heads"),
                                kernel_out_in=self.serving_layout)
        self.o_proj = linear(n * u, d, ("heads", "embed"))

    def _queries(self, x_btd, cos, sin):
        cfg = self.config
        if cfg.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_btd)))
        else:
            q = self.q_proj(x_btd)
        q_btnk = q.reshape(*x_btd.shape[:2], cfg.num_attention_heads, cfg.qk_head_dim)
        q_nope_btnh, q_pe_btnr = jnp.split(q_btnk, [cfg.qk_nope_head_dim], axis=-1)
        return q_nope_btnh, rotary.apply_rotary(q_pe_btnr, cos, sin)

    def _latent(self, x_btd, cos, sin):
        """The per-token cache entry: normalised `c_kv [B, T, C]`, rotated `k_pe [B, T, R]`."""
        kv = self.kv_a_proj_with_mqa(x_btd)
        ckv_btc, k_pe_btr = jnp.split(kv, [self.config.kv_lora_rank], axis=-1)
        k_pe_btr = rotary.apply_rotary(k_pe_btr[:, :, None, :], cos, sin)[:, :, 0, :]
        return self.kv_a_layernorm(ckv_btc), k_pe_btr

    def _kv_b_heads(self):
        """`kv_b_proj` as per-head key and value maps `[N, H, C]`, `[N, U, C]`."""
        cfg = self.config
        kernel = self.kv_b_proj.kernel
        if isinstance(kernel, quant.QuantizedWeight):
            kernel = quant.dequantize(kernel, jnp.dtype(cfg.dtype))
        n, c = cfg.num_attention_heads, cfg.kv_lora_rank
        kernel = kernel.astype(cfg.dtype)
        if self.kv_b_proj.stores_out_in:  # already head-major: no transpose per call
            kernel_nkc = kernel.reshape(n, -1, c)
        else:
            kernel_nkc = kernel.reshape(c, n, -1).transpose(1, 2, 0)
        return jnp.split(kernel_nkc, [cfg.qk_nope_head_dim], axis=1)

    def __call__(self, x_btd, positions_bt, segment_ids_bt=None, cache=None):
        """Args:
          x_btd: `[B, T, D]` normalised hidden states.
          positions_bt: int32 `[B, T]` absolute positions (cache slots when `cache` is given).
          segment_ids_bt: optional `[B, T]` ids of packed documents (cache-less form only).
          cache: optional `LayerCache`, this layer's view of the stack's cache; selects the
            absorbed form and writes this step's entries at `positions_bt`.
        Returns:
          `[B, T, D]`, the updated `LayerCache` (None without one), and the per-head maximum
          logit `[N]` with `max_logits` (else None).
        """
        cfg = self.config
        cos, sin = rotary.cos_sin(cfg, positions_bt)
        q_nope_btnh, q_pe_btnr = self._queries(x_btd, cos, sin)
        ckv_btc, k_pe_btr = self._latent(x_btd, cos, sin)
        max_logit_n = None
        if cache is None:
            out_btnu, max_logit_n = self._expanded(q_nope_btnh, q_pe_btnr, ckv_btc, k_pe_btr,
                                                   positions_bt, segment_ids_bt)
            new_cache = None
        else:
            if segment_ids_bt is not None:
                raise ValueError("segment_ids are for packed training batches, not cached decode")
            if self.max_logits:
                raise ValueError("max_logits is a statistic of the cache-less forward")
            out_btnu, new_cache = self._absorbed(q_nope_btnh, q_pe_btnr, ckv_btc, k_pe_btr,
                                                 positions_bt, cache)
        out = self.o_proj(out_btnu.reshape(*out_btnu.shape[:2], -1))
        return out, new_cache, max_logit_n

    def _expanded(self, q_nope_btnh, q_pe_btnr, ckv_bsc, k_pe_bsr, positions_bt, segment_ids_bt):
        cfg = self.config
        kv_bsnk = self.kv_b_proj(ckv_bsc).reshape(
            *ckv_bsc.shape[:2], cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope_bsnh, v_bsnu = jnp.split(kv_bsnk, [cfg.qk_nope_head_dim], axis=-1)
        q_btnk = jnp.concatenate([q_nope_btnh, q_pe_btnr], axis=-1)
        k_pe_bsnr = jnp.broadcast_to(k_pe_bsr[:, :, None, :], (*k_nope_bsnh.shape[:3],
                                                               cfg.qk_rope_head_dim))
        k_bsnk = jnp.concatenate([k_nope_bsnh, k_pe_bsnr], axis=-1)
        # Blockwise (online softmax): memory grows with T, not T^2.
        out_btnu = attention(q_btnk, k_bsnk, v_bsnu, positions_bt, positions_bt, segment_ids_bt,
                             segment_ids_bt, scale=cfg.softmax_scale)
        if not self.max_logits:
            return out_btnu, None
        max_btn = blockwise.max_scores(q_btnk, k_bsnk, positions_bt, positions_bt,
                                       segment_ids_bt, segment_ids_bt, scale=cfg.softmax_scale)
        return out_btnu, jnp.max(max_btn, axis=(0, 1))

    def _absorbed(self, q_nope_btnh, q_pe_btnr, ckv_btc, k_pe_btr, positions_bt, cache):
        cfg = self.config
        cache = cache.write(positions_bt, ckv_btc, k_pe_btr)
        w_uk_nhc, w_uv_nuc = self._kv_b_heads()
        q_latent_btnc = jnp.einsum("btnh,nhc->btnc", q_nope_btnh, w_uk_nhc)
        # The cache layout attends over its own storage (a paged one reads its pages in place).
        out_latent_btnc = cache.attend(q_latent_btnc, q_pe_btnr, positions_bt,
                                       scale=cfg.softmax_scale)
        return jnp.einsum("btnc,nuc->btnu", out_latent_btnc, w_uv_nuc), cache
