"""Fixtures shared by the server tests that run the real engine."""

import openai
import pytest

import k2jax
from serve import chat
from serve.engine import Engine
from serve.engine_loop import EngineLoop
from serve.server import BackgroundServer, OpenAIServer
from serve.server_cli import preset_for_tokenizer, random_params
from tests.serve.served import API_KEY, ENGINE_OPTIONS, LIMITS, MODEL, Served


@pytest.fixture(scope="module")
def tiny():
    """`(config, params, tokenizer)`: the `tiny` preset with random weights and the test
    tokenizer, sized to each other."""
    from k2jax.text.testing import tiny_tokenizer

    config = k2jax.ModelConfig.preset("tiny")
    tokenizer = tiny_tokenizer(config.vocab_size)
    config = preset_for_tokenizer(config, tokenizer)
    return config, random_params(config), tokenizer


@pytest.fixture(scope="module")
def served(tiny):
    """`Served`: one engine and server per module (`ENGINE_OPTIONS`, `LIMITS`, `API_KEY`)."""
    config, params, tokenizer = tiny
    engine = Engine(config, params, detokenize=chat.detokenizer(tokenizer), **ENGINE_OPTIONS)
    loop = EngineLoop(engine).start()
    app = OpenAIServer(loop, tokenizer, model_name=MODEL, limits=LIMITS, api_key=API_KEY).app()
    with BackgroundServer(app) as server:
        yield Served(engine, loop, tokenizer, server.url)
    loop.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0)
