"""The README's model snippet and convert block, and that every command is run or excused."""

import json

import k2jax
from tests.readme.conftest import COMMANDS, NOT_RUN


def test_every_command_is_run_or_excused():
    run_here = {"k2jax convert", "k2jax train", "k2jax generate", "k2jax serve", "python -c"}
    for command in COMMANDS["bash"]:
        assert command in NOT_RUN or any(command.startswith(p) for p in run_here), command
    assert set(NOT_RUN) <= set(COMMANDS["bash"]), set(NOT_RUN) - set(COMMANDS["bash"])
    assert len(COMMANDS["python"]) == 2


def test_model_snippet():
    scope = {}
    exec(COMMANDS["python"][0], scope)
    config, tokens, logits = scope["config"], scope["tokens"], scope["logits"]
    assert logits.shape == (tokens.shape[0], 1, config.vocab_size)
    import jax.numpy as jnp

    # The decode step's logits are the full forward's at the appended token.
    full = k2jax.logits(config, scope["params"],
                        jnp.concatenate([tokens, scope["next_token"]], axis=1))
    assert abs(full[:, -1:] - logits).max() <= 1e-2 * abs(full).max()


def test_convert_block(converted):
    data = converted / "data"
    assert (data / "k2-thinking" / "tiktoken.model").read_bytes() == (
        converted / "models" / "Kimi-K2-Thinking" / "tiktoken.model").read_bytes()
    config = json.loads((data / "k2-thinking-hf" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    int4_config, _ = k2jax.load(data / "k2-thinking")
    bf16_config, _ = k2jax.load(data / "k2-bf16")
    assert int4_config.quantized_linears == ("routed_experts",)
    assert bf16_config.quantized_linears == ()


