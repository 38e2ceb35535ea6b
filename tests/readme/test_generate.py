"""The README's generate snippet and commands, on a converted tiny K2 Thinking."""

from tests.readme.conftest import COMMANDS, _commands, _localize, _run


def test_generate_snippet_and_commands(converted):
    scope = {}
    exec(_localize(COMMANDS["python"][1], converted), scope)
    assert scope["results"][0].outputs[0].text is not None
    assert len(scope["results"][1].outputs[0].token_ids) > 0
    commands = _commands("k2jax generate")
    assert len(commands) == 4
    outputs = []
    for command in commands:
        out = _run(command, converted)
        assert "tokens/s" in out, out
        outputs.append([line for line in out.splitlines() if line.startswith("prompt ")])
    # The same random model on 8 devices (--mesh expert=8) samples the same tokens.
    assert "--mesh expert=8" in commands[3] and outputs[3] == outputs[2]


