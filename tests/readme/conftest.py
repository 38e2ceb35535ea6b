"""The README's commands, run as a user types them (shared by tests/readme/).

Every fenced `bash` and `python` block of README.md is cut into its commands; each is either run
here, exactly as written but with the README's example locations (`~/models/Kimi-K2-Thinking`,
`/data/...`) pointing at a small K2 Thinking style checkpoint this test builds, or named in
`NOT_RUN` with the reason. A command added to the README without either fails the test.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import k2jax
from k2jax.text.testing import write_tiny_tiktoken_file

README = Path(__file__).resolve().parents[2] / "README.md"
HUB = "~/models/Kimi-K2-Thinking"
NOT_RUN = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e \".[test]\" && k2jax demo":
        ".ci/run runs the set-up on a fresh clone",
    "python -m pytest -q -n 2 --dist loadfile": "this is the suite itself",
    "k2jax train --checkpoint /data/k2-thinking --data chats.jsonl --mesh fsdp=4,expert=32,"
    "tensor=4 --out runs/k2": "needs 512 devices",
    "k2jax train --checkpoint /data/k2-thinking --data chats.jsonl --mesh fsdp=4,expert=32,"
    "tensor=4 --out gs-fuse/runs/k2": "needs a TPU pod slice of 512 chips",
    "JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=$RANK k2jax serve "
    "--checkpoint /data/k2-thinking --mesh expert=32 --port 8000": "needs four GPU hosts",
    "for i in 0 1; do JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 "
    "JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i k2jax train "
    "--preset tiny --data corpus.jsonl --mesh fsdp=4 --out runs/two & done; wait":
        "tests/multihost/test_train.py runs this two-process job (with a free port)",
}
_AGENT = "tests/examples/test_agent_chain.py runs the agent's chain, shortened"
NOT_RUN.update({
    "python -m examples.agent_tasks runs/agent": _AGENT,
    "k2jax train --preset agent --data runs/agent/corpus.jsonl --tokenizer "
    "runs/agent/tokenizer/tiktoken.model --steps 2400 --batch-size 4 --seq-len 448 "
    "--whole-documents --learning-rate 5e-3 --warmup-steps 30 --compute-dtype float32 --qat "
    "routed_experts --out runs/agent/run-qat --export runs/agent/qat-int4": _AGENT,
    "k2jax convert --to hf runs/agent/qat-int4 runs/agent/qat-int4-hf": _AGENT,
    "k2jax convert runs/agent/qat-int4-hf runs/agent/qat-int4-back": _AGENT,
    "k2jax serve --checkpoint runs/agent/qat-int4-back --port 8000 &": _AGENT,
    'python -m examples.agent "What is 7 times the population of Calder?"': _AGENT,
    "python -m examples.agent --heldout 50": _AGENT,
})
TIMEOUT_S = 240


def readme_commands() -> dict[str, list[str]]:
    """`{"bash": [command, ...], "python": [block, ...]}`; a bash command is one line, with
    backslash continuations joined, comments dropped."""
    commands = {"bash": [], "python": []}
    for lang, body in re.findall(r"^```(bash|python)\n(.*?)^```$", README.read_text(),
                                 flags=re.M | re.S):
        if lang == "python":
            commands["python"].append(body)
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                commands["bash"].append(re.sub(r"\s+", " ", line))
    return commands


COMMANDS = readme_commands()


@pytest.fixture(scope="session")
def user(tmp_path_factory):
    """A working directory, and the README's example paths mapped into it: the hub directory is a
    tiny K2 Thinking (INT4 experts, compressed-tensors) with its tiktoken.model."""
    from tests.convert import hub
    from tests.hf_reference import hub_state_dict, random_hf_model

    root = tmp_path_factory.mktemp("user")
    config = k2jax.ModelConfig.preset("tiny").replace(dtype="float32")
    model = random_hf_model(config, seed=0)
    tensors = hub.int4_experts(hub.bf16(hub_state_dict(model)))
    hub_dir = root / "models" / "Kimi-K2-Thinking"
    hub.write_hub(hub_dir, tensors, model, quantization_config=hub.K2_THINKING_QUANTIZATION,
                  dtype="bfloat16")
    write_tiny_tiktoken_file(hub_dir, vocab_size=config.vocab_size)
    (root / "data").mkdir()
    (root / "work").mkdir()
    return root


def _localize(text: str, root: Path) -> str:
    return text.replace(HUB, str(root / "models" / "Kimi-K2-Thinking")).replace(
        "/data/", f"{root}/data/")


def _env():
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    return env


def _run(command: str, root: Path) -> str:
    done = subprocess.run(["bash", "-c", _localize(command, root)], cwd=root / "work",
                          env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _commands(prefix: str) -> list[str]:
    return [c for c in COMMANDS["bash"] if c.startswith(prefix) and c not in NOT_RUN]


@pytest.fixture(scope="session")
def converted(user):
    """The convert block: to Orbax (INT4 kept), dequantized, and back to the hub format."""
    for command in _commands("k2jax convert"):
        _run(command, user)
    return user


