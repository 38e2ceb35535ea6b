"""Host-side pack-quantized format: tiled transpose, and pack/unpack inverting each other on
arbitrary words (tests/k2jax/test_quant.py holds them to the compressed-tensors package)."""

import ml_dtypes
import numpy as np
import pytest

from k2jax import compressed_tensors

# [out, in]: K2's expert shapes, and shapes that are not multiples of the transpose tile.
SHAPES_OUT_IN = [(2048, 7168), (7168, 2048), (40, 64), (300, 96)]


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32, ml_dtypes.int4, np.uint8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 700), (513, 257)])
def test_transpose(shape, dtype):
    x = np.random.default_rng(0).integers(-8, 8, shape).astype(dtype)
    got = compressed_tensors.transpose(x)
    assert got.dtype == x.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got.view(f"u{x.dtype.itemsize}"),
                                  np.ascontiguousarray(x.T).view(f"u{x.dtype.itemsize}"))


def _packed(shape_out_in, seed, lead=()):
    rng = np.random.default_rng(seed)
    dout, din = shape_out_in
    packed = rng.integers(-2**31, 2**31, (*lead, dout, din // 8), dtype=np.int64).astype(np.int32)
    scale = (rng.random((*lead, dout, din // 32)) * 1e-2).astype(ml_dtypes.bfloat16)
    return packed, scale, np.array([dout, din], np.int64)


@pytest.mark.parametrize("shape", SHAPES_OUT_IN)
def test_pack_inverts_unpack_on_every_word(shape):
    packed, scale, weight_shape = _packed(shape, seed=1)
    qw = compressed_tensors.unpack(packed, scale, weight_shape)
    assert qw.values.dtype == ml_dtypes.int4 and qw.values.shape == shape[::-1]
    # Stored canonically (v & 0xF), as ml_dtypes' own cast stores it, so chunk files written
    # from either path are identical.
    canonical = qw.values.astype(np.int8).astype(ml_dtypes.int4)
    np.testing.assert_array_equal(qw.values.view(np.uint8), canonical.view(np.uint8))
    back = compressed_tensors.pack(qw)
    np.testing.assert_array_equal(back["weight_packed"], packed)
    np.testing.assert_array_equal(back["weight_scale"].view(np.uint16), scale.view(np.uint16))
    assert back["weight_shape"].dtype == np.int64
    np.testing.assert_array_equal(back["weight_shape"], weight_shape)


def test_element_order_within_a_word():
    # Word 0x76543210 + 0x88888888 holds nibbles 8..15 = values 0..7 at elements 0..7.
    word = np.array([[np.uint32(0xFEDCBA98).view(np.int32)]], np.int32)
    qw = compressed_tensors.unpack(word, np.ones((1, 1), ml_dtypes.bfloat16), [1, 8])
    np.testing.assert_array_equal(qw.values.astype(np.int8)[:, 0], np.arange(8))


def test_stacked_experts_round_trip():
    packed, scale, weight_shape = _packed((40, 64), seed=2, lead=(3,))
    qw = compressed_tensors.unpack(packed, scale, weight_shape)
    assert qw.values.shape == (3, 64, 40) and qw.scale.shape == (3, 2, 40)
    single = compressed_tensors.unpack(packed[1], scale[1], weight_shape)
    np.testing.assert_array_equal(qw.values[1].view(np.uint8), single.values.view(np.uint8))
    np.testing.assert_array_equal(compressed_tensors.pack(qw)["weight_packed"], packed)


def test_unpack_rejects_a_mismatched_shape():
    packed, scale, _ = _packed((40, 64), seed=3)
    with pytest.raises(ValueError, match=r"does not hold weight_shape \[40, 72\]"):
        compressed_tensors.unpack(packed, scale, np.array([40, 72]))
