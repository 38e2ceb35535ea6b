"""Implementation choice, the interpret-mode NaN poisoning the kernel tests rely on, and
the grouped matmul's work list."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.grouped_matmul import tiling


def test_resolve_picks_reference_on_cpu_and_kernels_by_platform():
    assert common.resolve("auto", None, False) == "reference"
    assert common.resolve("auto", "gpu", False) == "triton"
    assert common.resolve("auto", "tpu", False) == "tpu"
    assert common.resolve("pallas", "tpu", True) == "tpu"
    assert common.resolve("reference", "gpu", False) == "reference"
    with pytest.raises(ValueError, match="impl must be"):
        common.resolve("fast", None, False)
    with pytest.raises(ValueError, match="no kernel"):
        common.resolve("pallas", "cpu", False)


def test_interpret_mode_leaves_unwritten_outputs_nan():
    # The kernel tests assert finite outputs to prove every element was written; that proof
    # holds because interpret mode fills what a kernel never stores with NaN / INT_MIN.
    def half(x_ref, o_ref, i_ref):
        o_ref[:2] = x_ref[:2]
        i_ref[:2] = jnp.zeros((2, 8), jnp.int32)

    out, idx = pl.pallas_call(half, out_shape=(jax.ShapeDtypeStruct((4, 8), jnp.float32),
                                               jax.ShapeDtypeStruct((4, 8), jnp.int32)),
                              interpret=True)(jnp.ones((4, 8)))
    assert np.isfinite(out[:2]).all() and np.isnan(out[2:]).all()
    assert (np.asarray(idx[2:]) == np.iinfo(np.int32).min).all()


@pytest.mark.parametrize("sizes,num_rows,block_m", [
    ([7, 0, 20, 0, 6], 40, 16),   # straddling tiles, empty experts, 7 tail rows
    ([0, 0, 32], 32, 16),         # leading empty experts, sum == M, aligned
    ([1] * 8, 8, 16),             # every expert in one tile
    ([0, 0, 0], 5, 4),            # no routed rows at all: only the tail
    ([3, 5, 0, 9, 1, 0, 2], 64, 8),
])
def test_work_list_covers_every_row_once(sizes, num_rows, block_m):
    work = jax.tree.map(np.asarray, tiling.work_list(jnp.array(sizes, jnp.int32), num_rows,
                                                     block_m))
    num_items = int(work.num_items[0])
    assert work.group_ids.shape[0] == tiling.max_items(num_rows, len(sizes), block_m)
    assert 1 <= num_items <= work.group_ids.shape[0]
    owner = np.full(num_rows, -1)
    for g, t in zip(work.group_ids[:num_items], work.tile_ids[:num_items]):
        rows = np.arange(t * block_m, min((t + 1) * block_m, num_rows))
        mine = rows[(rows >= work.group_starts[g]) & (rows < work.group_ends[g])]
        assert mine.size, "an item with no rows"
        assert (owner[mine] == -1).all(), "a row written twice"
        owner[mine] = g
    expected = np.repeat(np.arange(len(sizes) + 1), sizes + [num_rows - sum(sizes)])
    np.testing.assert_array_equal(owner, expected)
    # Padding repeats the last real item; tiles never go backwards (TPU output revisits).
    assert (work.group_ids[num_items:] == work.group_ids[num_items - 1]).all()
    assert (np.diff(work.tile_ids) >= 0).all()
