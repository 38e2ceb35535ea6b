"""Top-k expert routing: `route(logits, bias, ..., impl=...)`."""

from pallas_kernels.topk_routing.api import route

__all__ = ["route"]
