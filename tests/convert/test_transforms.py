"""The fast transforms equal the reference ones bit for bit: `transpose` equals numpy's, and
`unpack_int4`/`pack_int4` equal `k2jax.quant`'s compressed-tensors import/export (which
tests/k2jax/test_quant.py holds to compressed-tensors itself)."""

import ml_dtypes
import numpy as np
import pytest

from convert import transforms
from k2jax import quant

# [out, in]: K2's expert shapes, and shapes that are not multiples of the transpose tile.
SHAPES_OUT_IN = [(2048, 7168), (7168, 2048), (40, 64), (300, 96)]


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32, ml_dtypes.int4, np.uint8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 700), (513, 257)])
def test_transpose(shape, dtype):
    x = np.random.default_rng(0).integers(-8, 8, shape).astype(dtype)
    got = transforms.transpose(x)
    assert got.dtype == x.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got.view(f"u{x.dtype.itemsize}"),
                                  np.ascontiguousarray(x.T).view(f"u{x.dtype.itemsize}"))


def _packed(shape_out_in, seed):
    rng = np.random.default_rng(seed)
    dout, din = shape_out_in
    packed = rng.integers(-2**31, 2**31, (dout, din // 8), dtype=np.int64).astype(np.int32)
    scale = (rng.random((dout, din // 32)) * 1e-2).astype(ml_dtypes.bfloat16)
    return packed, scale, np.array([dout, din], np.int64)


@pytest.mark.parametrize("shape", SHAPES_OUT_IN)
def test_unpack_int4_equals_quant(shape):
    packed, scale, weight_shape = _packed(shape, seed=1)
    got = transforms.unpack_int4(packed, scale, weight_shape)
    want = quant.unpack_compressed_tensors(packed, scale, weight_shape)
    assert got.values.dtype == ml_dtypes.int4 and got.values.shape == want.values.shape
    np.testing.assert_array_equal(got.values.astype(np.int8), want.values.astype(np.int8))
    # Stored canonically (v & 0xF), as ml_dtypes' own cast stores it: chunk files are
    # deterministic whichever path produced the values.
    np.testing.assert_array_equal(got.values.view(np.uint8),
                                  want.values.astype(np.int8).astype(ml_dtypes.int4)
                                  .view(np.uint8))
    np.testing.assert_array_equal(got.scale.view(np.uint16), want.scale.view(np.uint16))


@pytest.mark.parametrize("shape", SHAPES_OUT_IN)
def test_pack_int4_equals_quant_and_inverts_unpack(shape):
    packed, scale, weight_shape = _packed(shape, seed=2)
    qw = transforms.unpack_int4(packed, scale, weight_shape)
    got = transforms.pack_int4(qw)
    want = quant.pack_compressed_tensors(qw)
    np.testing.assert_array_equal(got["weight_packed"], want["weight_packed"])
    np.testing.assert_array_equal(got["weight_packed"], packed)
    np.testing.assert_array_equal(got["weight_scale"].view(np.uint16), scale.view(np.uint16))
    assert got["weight_shape"].dtype == np.int64
    np.testing.assert_array_equal(got["weight_shape"], weight_shape)


def test_unpack_int4_rejects_a_mismatched_shape():
    packed, scale, _ = _packed((40, 64), seed=3)
    with pytest.raises(ValueError, match=r"does not hold weight_shape \[40, 72\]"):
        transforms.unpack_int4(packed, scale, np.array([40, 72]))
