"""What the server tests share: the served `tiny` model's constants and handle."""

import dataclasses

from serve.engine import Engine
from serve.engine_loop import EngineLoop
from serve.server import ServerLimits

API_KEY = "sk-tiny"
MODEL = "k2jax-tiny"
# 2 slots, prefill chunks of 16, context 128: every module serving `tiny` compiles the same
# programs, so the jit cache serves them all.
ENGINE_OPTIONS = dict(max_batch=2, max_seq_len=128, prefill_chunk=16)
LIMITS = ServerLimits(max_seq_len=128, max_prompt_tokens=110, max_tokens=64)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclasses.dataclass(frozen=True)
class Served:
    """The `tiny` model behind a real engine, its loop and an OpenAI server on loopback."""

    engine: Engine
    loop: EngineLoop
    tokenizer: object
    url: str
