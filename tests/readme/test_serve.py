"""The README's serve commands, each started on a free port and asked with tools and in heavy mode."""

import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.readme.conftest import TIMEOUT_S, _commands, _env, _localize


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(command: str, root: Path):
    """Starts the README's serve command on a free port (8000 may be taken here); returns the
    process and its URL once `/health` answers."""
    port = _free_port()
    argv = shlex.split(_localize(command, root).replace("--port 8000", f"--port {port}"))
    process = subprocess.Popen(argv, cwd=root / "work", env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                if response.status == 200:
                    return process, url
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"{command}: no /health within {TIMEOUT_S} s")


def _stop(process) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    finally:
        process.kill()


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string"}},
                   "required": ["city"]}}}]


@pytest.mark.parametrize("which", range(len(_commands("k2jax serve"))))
def test_serve_commands_take_tools_and_heavy_mode(converted, which):
    command = _commands("k2jax serve")[which]
    process, url = _serve(command, converted)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        answer = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                                max_tokens=8, temperature=0)
        assert answer.choices[0].finish_reason in ("length", "stop", "tool_calls")
        assert answer.usage.prompt_tokens > 128  # the tiny preset's context used to be 128
        chunks = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                                max_tokens=8, temperature=0, stream=True)
        streamed = [c.choices[0] for c in chunks if c.choices]
        assert streamed[-1].finish_reason == answer.choices[0].finish_reason
        assert "".join(c.delta.content or "" for c in streamed) == (
            answer.choices[0].message.content or "")
        heavy = client.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                               extra_body={"heavy": {"n": 2}})
        assert heavy.choices[0].message is not None
    finally:
        _stop(process)
