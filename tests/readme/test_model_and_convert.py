"""The README's model snippet and convert block, and that every command is run or excused."""

import json

import k2jax
import re

from tests.readme.conftest import COMMANDS, NOT_RUN, README, _commands, _run


def test_every_command_is_run_or_excused():
    run_here = {"k2jax plan", "k2jax convert", "k2jax train", "k2jax generate", "k2jax serve", "python -c"}
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




def _printed_plan() -> list[str]:
    """The plan output the README shows (the unlabelled block after the plan command)."""
    (block,) = re.findall(r"^```\n(kimi-k2-thinking: decode step.*?)^```$", README.read_text(),
                          flags=re.M | re.S)
    return block.splitlines()


def test_plan_command_prints_what_the_readme_shows(user):
    (command,) = _commands("k2jax plan")
    printed = _run(command, user).splitlines()
    shown = _printed_plan()
    # Exact figures; compile time and XLA:CPU's activation and collective estimates vary with
    # the machine and the XLA version.
    exact = ("expert-parallel", "parameters", "per device", "params", "cache", "inputs",
             "sampler", "outputs", "fits", "collectives")
    assert ([line for line in printed if line.strip().startswith(exact)] ==
            [line for line in shown if line.strip().startswith(exact)])
    assert printed[0].startswith(shown[0].split(" (")[0])
    # The table's first row is the printed block's figures.
    figures = {line.split()[0]: line.split()[1] for line in shown if "GiB" in line}
    row = next(line for line in README.read_text().splitlines()
               if line.startswith("| `expert=8` (8x H200)"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2:] == [figures["params"], f"{figures['cache']} cache", figures["activations"],
                         f"{figures['total']} (fits 141)"]
