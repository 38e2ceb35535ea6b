"""INT4 format: bit-exact agreement with the installed compressed-tensors package.

compressed-tensors quantizes and packs in the tests themselves; k2jax must read its tensors back
to the same values and scales, write tensors it reads back to the same values, and quantize a
bf16 weight to exactly the values and scales it computes.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

from k2jax import compressed_tensors, quant
from pallas_kernels.grouped_matmul import grouped_matmul

ARGS = QuantizationArgs(num_bits=4, symmetric=True, strategy="group", group_size=32)
SHAPES_OUT_IN = [(64, 256), (48, 96), (8, 7168 // 14)]


def _bf16_weight_out_in(seed, shape, zero_group=True):
    """A bf16 torch weight `[out, in]` with a spread of magnitudes and one all-zero group."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[0], 1, generator=gen))
    if zero_group:
        w[0, :32] = 0
    return w.to(torch.bfloat16)


def _ct_quantize(w_out_in):
    """compressed-tensors' own group quantization: int8 values `[out, in]`, scale `[out, in/32]`."""
    scale, zero_point = compute_dynamic_scales_and_zp(w_out_in, ARGS, module=None)
    q = ct_quantize(x=w_out_in, scale=scale, zero_point=zero_point, args=ARGS, dtype=torch.int8)
    return q, scale


def _to_np(t):
    """torch tensor -> numpy, bf16 kept as ml_dtypes bf16 (through exact float32)."""
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.parametrize("shape", SHAPES_OUT_IN)
def test_quantize_matches_compressed_tensors(shape):
    w = _bf16_weight_out_in(0, shape)
    q_ct, scale_ct = _ct_quantize(w)
    qw = quant.quantize(jnp.asarray(_to_np(w).T), group_size=32)
    np.testing.assert_array_equal(np.asarray(qw.values).astype(np.int8).T, q_ct.numpy())
    assert qw.scale.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(qw.scale).T.view(np.uint16),
                                  _to_np(scale_ct).view(np.uint16))


@pytest.mark.parametrize("shape", SHAPES_OUT_IN)
def test_unpack_reads_compressed_tensors_tensors(shape):
    w = _bf16_weight_out_in(1, shape)
    q_ct, scale_ct = _ct_quantize(w)
    packed = pack_to_int32(q_ct, 4)
    qw = compressed_tensors.unpack(packed.numpy(), _to_np(scale_ct),
                                         np.array(w.shape, np.int32))
    assert qw.values.dtype == jnp.int4 and qw.values.shape == (shape[1], shape[0])
    np.testing.assert_array_equal(qw.values.astype(np.int8).T, q_ct.numpy())
    np.testing.assert_array_equal(qw.scale.T.view(np.uint16), _to_np(scale_ct).view(np.uint16))
    # The dequantized weight equals compressed-tensors' own decompression, bit for bit.
    w_ct = ct_dequantize(q_ct, scale_ct, None, ARGS)
    w_here = quant.dequantize(jax.tree.map(jnp.asarray, qw), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(w_here).T.view(np.uint16),
                                  _to_np(w_ct).view(np.uint16))


@pytest.mark.parametrize("shape", SHAPES_OUT_IN)
def test_pack_is_what_compressed_tensors_writes_and_reads(shape):
    w = _bf16_weight_out_in(2, shape)
    qw = quant.quantize(jnp.asarray(_to_np(w).T), group_size=32)
    tensors = compressed_tensors.pack(qw)
    assert tensors["weight_packed"].dtype == np.int32
    assert tensors["weight_packed"].shape == (shape[0], shape[1] // 8)
    assert tensors["weight_scale"].dtype == ml_dtypes.bfloat16
    assert tensors["weight_scale"].shape == (shape[0], shape[1] // 32)
    assert tensors["weight_shape"].dtype == np.int64  # as compressed-tensors writes it
    np.testing.assert_array_equal(tensors["weight_shape"], np.array(shape))
    unpacked = unpack_from_int32(torch.from_numpy(tensors["weight_packed"]), 4,
                                 torch.Size(tensors["weight_shape"].tolist()))
    np.testing.assert_array_equal(unpacked.numpy(), np.asarray(qw.values).astype(np.int8).T)
    q_ct, _ = _ct_quantize(w)
    np.testing.assert_array_equal(tensors["weight_packed"], pack_to_int32(q_ct, 4).numpy())


def test_round_trip_of_stacked_experts_covers_every_nibble():
    # All 16 values in every nibble position, stacked [E, in, out].
    values = (np.arange(3 * 64 * 40) % 16 - 8).reshape(3, 64, 40).astype(ml_dtypes.int4)
    scale = np.random.default_rng(0).standard_normal((3, 2, 40)).astype(ml_dtypes.bfloat16)
    tensors = compressed_tensors.pack(quant.QuantizedWeight(values, scale))
    assert tensors["weight_packed"].shape == (3, 40, 8)
    back = compressed_tensors.unpack(**tensors)
    np.testing.assert_array_equal(back.values.astype(np.int8), values.astype(np.int8))
    np.testing.assert_array_equal(back.scale.view(np.uint16), scale.view(np.uint16))


def test_unpack_rejects_mismatched_shape():
    with pytest.raises(ValueError, match="does not hold"):
        compressed_tensors.unpack(np.zeros((4, 2), np.int32), np.zeros((4, 1)),
                                        np.array([4, 32]))


def test_fake_quantize_value_and_straight_through_gradient():
    w = jax.random.normal(jax.random.key(0), (64, 16), jnp.float32)
    np.testing.assert_array_equal(quant.fake_quantize(w),
                                  quant.dequantize(quant.quantize(w), jnp.float32))
    grad = jax.grad(lambda w: jnp.sum(quant.fake_quantize(w) * jnp.arange(16.0)))(w)
    np.testing.assert_array_equal(grad, jnp.broadcast_to(jnp.arange(16.0), w.shape))


def _assert_close_bf16(got, want):
    """bf16 outputs: within 1% of the output's scale."""
    want = np.asarray(want, np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2,
                               atol=1e-2 * np.abs(want).max())


def test_matmuls_on_quantized_weights_match_dequantized():
    kx, kw, ke = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 5, 64), jnp.float32).astype(jnp.bfloat16)
    qw = quant.quantize(jax.random.normal(kw, (64, 48), jnp.float32))
    dense = quant.dequantize(qw, jnp.float32)
    want = jnp.einsum("bti,io->bto", x.astype(jnp.float32), dense)
    got = quant.matmul(x, qw, jnp.bfloat16)
    _assert_close_bf16(got, want)
    qe = quant.quantize(jax.random.normal(ke, (3, 64, 48), jnp.float32))
    sizes = jnp.array([4, 0, 3], jnp.int32)
    x_mk = x.reshape(10, 64)
    got = grouped_matmul(x_mk, qe, sizes, jnp.bfloat16)
    experts = jnp.repeat(jnp.arange(3), sizes, total_repeat_length=10)
    want = jnp.einsum("mi,mio->mo", x_mk.astype(jnp.float32),
                      quant.dequantize(qe, jnp.float32)[experts])
    want = jnp.where((jnp.arange(10) < 7)[:, None], want, 0)
    _assert_close_bf16(got, want)
