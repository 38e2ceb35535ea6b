"""`k2jax serve` as a two-host job (2 processes x 2 CPU devices, mesh expert=4; process 0 serves
HTTP and schedules, process 1 follows its steps) against the same server in one process with 4
devices: equal greedy tokens through the `openai` client; a follower SIGKILLed makes the server
fail requests with an error and stop (so `/health` no longer answers ok) within seconds."""

import signal
import time

import httpx2
import openai
import pytest

from tests.multihost.harness import Job, free_port, python

MODEL = "k2jax-tiny"
START_TIMEOUT = 240  # seconds for a server to load, compile nothing yet and answer /health
REQUEST = dict(model=MODEL, prompt="Hello there", max_tokens=12, temperature=0, logprobs=1)
# No LLVM optimisation: the servers compile in a fraction of the time, alike in both jobs.
ENV = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}


def _serve(port):
    return python("-m", "cli", "serve", "--preset", "tiny", "--mesh", "expert=4",
                  "--max-batch", 4, "--max-seq-len", 128, "--port", port, "--log-level",
                  "warning")


def _healthy(url) -> bool:
    try:
        return httpx2.get(url + "/health", timeout=2).status_code == 200
    except httpx2.HTTPError:
        return False


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def servers(tmp_path):
    ports = free_port(), free_port()
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    with Job(_serve(ports[0]), 1, 4, tmp_path, env=ENV, name="one") as one, \
            Job(_serve(ports[1]), 2, 2, tmp_path, env=ENV, name="two") as two:
        for job, url in ((one, urls[0]), (two, urls[1])):
            job.wait_for(lambda url=url: _healthy(url), START_TIMEOUT)
        yield (one, urls[0]), (two, urls[1])


def test_two_process_server_answers_as_one_and_fails_fast_without_a_host(servers):
    (_, one_url), (two, two_url) = servers
    alone = _client(one_url).completions.create(**REQUEST).choices[0]
    shared = _client(two_url).completions.create(**REQUEST).choices[0]
    assert shared.logprobs.tokens == alone.logprobs.tokens and shared.text == alone.text
    assert len(alone.logprobs.tokens) == 12
    chat = _client(two_url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.choices[0].finish_reason in ("stop", "length")

    two.kill(1, signal.SIGKILL)
    began = time.monotonic()
    deadline = began + 20
    while _healthy(two_url):  # the idle heartbeat finds the lost host
        assert time.monotonic() < deadline, "still healthy without its second host"
        time.sleep(0.2)
    with pytest.raises((openai.APIStatusError, openai.APIConnectionError)):
        _client(two_url).with_options(timeout=10).completions.create(**REQUEST)
    assert two.procs[0].wait(timeout=30) == 1  # exits non-zero for a supervisor to restart
    assert time.monotonic() - began < 40
