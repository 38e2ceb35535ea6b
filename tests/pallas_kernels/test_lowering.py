"""Every Pallas kernel lowers for its real target at Kimi K2 shapes, on a CPU-only machine
(`pallas_kernels.lowering`: Triton for `cuda`, Mosaic for `tpu`). The exported modules are
also checked to hold the kernel's custom call and no bf16 copy of a weight: the
dequantized weight exists only in registers / VMEM.
"""

import json

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.attention import api as attention_api
from pallas_kernels.attention.paged import paged_latent_attention
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.int4_matmul import int4_matmul
from pallas_kernels.lowering import KERNEL_CALL, export, kernel_platform
from pallas_kernels.quantized import QuantizedWeight
from pallas_kernels.topk_routing import route

TRITON_CALL, MOSAIC_CALL = KERNEL_CALL["cuda"], KERNEL_CALL["tpu"]
_export, _kernel_platform = export, kernel_platform


def _assert_kernel_without_bf16_weight(exported, platform, weight_shape):
    text = exported.mlir_module()
    assert (TRITON_CALL if platform == "cuda" else MOSAIC_CALL) in text
    bf16_weight = "tensor<" + "x".join(map(str, weight_shape)) + "xbf16>"
    assert bf16_weight not in text, f"a bf16 {weight_shape} weight is materialised"


def _spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("m,k,n", [(1, 7168, 2048), (64, 2048, 7168), (4096, 7168, 2048)])
def test_int4_matmul_lowers(platform, m, k, n):
    fn = lambda x, v, s: int4_matmul(x, v, s, impl="pallas",
                                     platform=_kernel_platform(platform))
    args = (_spec((m, k), jnp.bfloat16), _spec((k, n), jnp.int4),
            _spec((k // 32, n), jnp.bfloat16))
    _assert_kernel_without_bf16_weight(_export(fn, args, platform), platform, (k, n))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("m,k,n", [(64, 7168, 2048), (32768, 2048, 7168)])
def test_grouped_int4_matmul_lowers(platform, m, k, n):
    e = 384
    fn = lambda x, v, s, g: grouped_matmul(x, QuantizedWeight(v, s), g, impl="pallas",
                                           platform=_kernel_platform(platform))
    args = (_spec((m, k), jnp.bfloat16), _spec((e, k, n), jnp.int4),
            _spec((e, k // 32, n), jnp.bfloat16), _spec((e,), jnp.int32))
    _assert_kernel_without_bf16_weight(_export(fn, args, platform), platform, (e, k, n))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("tokens,experts,n_group,topk_group", [(64, 384, 1, 1),
                                                               (4096, 256, 8, 4)])
def test_routing_lowers(platform, tokens, experts, n_group, topk_group):
    fn = lambda logits, bias: route(logits, bias, top_k=8, n_group=n_group,
                                    topk_group=topk_group, routed_scaling_factor=2.827,
                                    impl="pallas", platform=_kernel_platform(platform))
    args = (_spec((tokens, experts), jnp.float32), _spec((experts,), jnp.float32))
    text = _export(fn, args, platform).mlir_module()
    assert (TRITON_CALL if platform == "cuda" else MOSAIC_CALL) in text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("b,t,k,groups,u,s", [(1, 1024, 192, 64, 128, 1024),
                                              (8, 1, 576, 1, 512, 8192),
                                              (1, 256, 576, 1, 512, 4096)],
                         ids=["expanded-prefill", "absorbed-decode", "absorbed-prefill"])
def test_attention_lowers_at_k2_shapes(platform, b, t, k, groups, u, s):
    """K2's 64 heads: expanded MLA (q/k 192, v 128, a key per head) and absorbed MLA (one
    shared 512 + 64 latent key, 512 value), bf16."""
    fn = lambda *a: attention_api.attention(*a, scale=0.1, impl="pallas",  # noqa: E731
                                            platform=_kernel_platform(platform))
    args = (_spec((b, t, 64, k), jnp.bfloat16), _spec((b, s, groups, k), jnp.bfloat16),
            _spec((b, s, groups, u), jnp.bfloat16), _spec((b, t), jnp.int32),
            _spec((b, s), jnp.int32))
    text = _export(fn, args, platform).mlir_module()
    assert (TRITON_CALL if platform == "cuda" else MOSAIC_CALL) in text
    # No score matrix over the whole context leaves the kernel.
    assert f"x{s}xf32>" not in text.replace(f"{b}x{s}xf32", "")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("b,t,width", [(8, 1, 128), (1, 256, 64)], ids=["decode", "prefill"])
def test_paged_latent_attention_lowers_at_k2_shapes(platform, b, t, width):
    """K2's absorbed MLA over its paged cache: 64 heads, 512 latent + 64 rope dims, pages of 64
    tokens in a pool of 61 layers, bf16; the pools enter the kernel whole (read through the page
    table inside it), never gathered."""
    layers, pages, page = 61, 1024, 64
    fn = lambda *a: paged_latent_attention(*a, scale=0.1, impl="pallas",  # noqa: E731
                                           platform=_kernel_platform(platform))
    args = (_spec((b, t, 64, 512), jnp.bfloat16), _spec((b, t, 64, 64), jnp.bfloat16),
            _spec((layers, pages, page, 512), jnp.bfloat16),
            _spec((layers, pages, page, 64), jnp.bfloat16), _spec((b, width), jnp.int32),
            _spec((), jnp.int32), _spec((b, t), jnp.int32))
    text = _export(fn, args, platform).mlir_module()
    assert (TRITON_CALL if platform == "cuda" else MOSAIC_CALL) in text
    assert f"{b}x{width * page}x512" not in text  # no gathered context


def test_device_check_lowers_every_kernel_on_this_host(tmp_path, capsys):
    """`python -m benchmarks.device_check` without an accelerator: every kernel lowered for both
    targets, one table, JSON when asked, exit status 0."""
    from benchmarks import device_check

    assert device_check.main(["--json", str(tmp_path / "check.json")]) == 0
    rows = json.loads((tmp_path / "check.json").read_text())["lowering"]
    assert {r["platform"] for r in rows} == {"cuda", "tpu"}
    assert len(rows) == 2 * len(device_check.cases(small=False))
    assert all(r["status"] == "ok" for r in rows), rows
    assert "FAILED" not in capsys.readouterr().out
