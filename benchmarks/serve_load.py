"""Load test of `k2jax serve`: concurrent streaming chat clients on loopback.

    python benchmarks/serve_load.py --preset tiny   # table; --write saves results/serve_load.json
    python benchmarks/serve_load.py --preset small --max-batch 8 --requests 48
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME   # a running server

Starts `k2jax serve --preset NAME` in a subprocess on a free 127.0.0.1 port (unless `--url`),
sends warm-up requests until every batch shape has compiled (these are not counted), then runs
each concurrency level in turn: `C` clients, each sending streaming chat completions back to
back until the level's request count or time budget is spent. It stops by itself.

Per level it reports requests/s, output tokens/s (from the servers' usage counts), and latency
percentiles: TTFT (time to the first chunk carrying generated text, reasoning, a tool call or a
finish reason; the role chunk is sent before generation and does not count) and end to end.
Concurrency 1 is the baseline: requests one at a time, no batching. Results are printed as a
table; `--write` (or `--json PATH`) adds this run's entry to benchmarks/results/serve_load.json
(or PATH), one entry per preset or URL, keeping the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import _results  # benchmarks/_results.py, beside this script

import httpx2
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain continuous batching in one sentence.", "List three prime numbers.",
             "How far is the Moon?", "Name a color.", "Why is the sky blue?", "Say hi."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, "-m", "cli", "serve", "--preset", args.preset,
               "--port", str(port), "--max-batch", str(args.max_batch), "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(command, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            if httpx2.get(url + "/health", timeout=2).status_code == 200:
                return server, url
        except httpx2.TransportError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise SystemExit(f"the server did not come up within {args.startup_timeout} s")


async def one_request(http: httpx2.AsyncClient, model: str, index: int, max_tokens: int) -> dict:
    """A streaming chat completion; returns its timings and token count."""
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": max_tokens, "seed": index,
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}]}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                delta = {k: v for k, v in choice["delta"].items() if k != "role" and v}
                if first is None and (delta or choice["finish_reason"]):
                    first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "e2e": end - start, "tokens": tokens}


async def run_level(url: str, model: str, clients: int, requests: int, budget_s: float,
                    max_tokens: int) -> dict:
    """`clients` concurrent clients share `requests` requests (or stop at `budget_s`)."""
    results, next_index = [], iter(range(requests))
    deadline = time.monotonic() + budget_s

    async def client(http):
        for index in next_index:
            if time.monotonic() > deadline:
                return
            results.append(await one_request(http, model, index, max_tokens))

    limits = httpx2.Limits(max_connections=clients)
    async with httpx2.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start

    def percentiles(key):
        values = np.array([r[key] for r in results]) * 1000
        return {f"p{p}": round(float(np.percentile(values, p)), 1) for p in (50, 90, 99)}

    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "seconds": round(elapsed, 2),
            "requests_per_s": round(len(results) / elapsed, 2),
            "output_tokens_per_s": round(tokens / elapsed, 1), "output_tokens": tokens,
            "ttft_ms": percentiles("ttft"), "e2e_ms": percentiles("e2e")}


async def warm_up(url: str, model: str, max_batch: int, max_tokens: int) -> None:
    """Compiles the engine's programs for every batch size the levels will use."""
    size = 1
    while size <= max_batch:
        await run_level(url, model, size, size, 1e9, max_tokens)
        size *= 2


def print_table(name: str, levels: list[dict]) -> None:
    print(f"\n{name}")
    print(f"{'clients':>7} {'reqs':>5} {'req/s':>7} {'out tok/s':>10} "
          f"{'TTFT p50/p90/p99 ms':>22} {'E2E p50/p90/p99 ms':>22}")
    for level in levels:
        ttft, e2e = level["ttft_ms"], level["e2e_ms"]
        print(f"{level['clients']:>7} {level['requests']:>5} {level['requests_per_s']:>7} "
              f"{level['output_tokens_per_s']:>10} "
              f"{'/'.join(str(int(ttft[k])) for k in ('p50', 'p90', 'p99')):>22} "
              f"{'/'.join(str(int(e2e[k])) for k in ('p50', 'p90', 'p99')):>22}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--url", help="benchmark a running server instead of starting one")
    parser.add_argument("--model", help="model id (default: k2jax-PRESET)")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's slots")
    parser.add_argument("--clients", default="1,8,32",
                        help="concurrency levels, comma-separated (default %(default)s)")
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--level-budget", type=float, default=120,
                        help="seconds per level at most")
    parser.add_argument("--startup-timeout", type=float, default=600)
    _results.add_arguments(parser, "serve_load")
    args = parser.parse_args()
    model = args.model or f"k2jax-{args.preset}"
    server = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        server, url = start_server(args)
    try:
        started = time.perf_counter()
        asyncio.run(warm_up(url, model, args.max_batch, args.max_tokens))
        warm_s = time.perf_counter() - started
        levels = [asyncio.run(run_level(url, model, int(c), args.requests, args.level_budget,
                                        args.max_tokens)) for c in args.clients.split(",")]
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    name = args.url or args.preset
    print_table(f"{name}: max_batch {args.max_batch}, max_tokens {args.max_tokens}, "
                f"warm-up (compiles) {warm_s:.0f} s", levels)
    target = _results.path(args, "serve_load")  # one entry per server, kept across runs
    results = json.loads(target.read_text()) if target and target.exists() else {}
    results[name] = {"max_batch": args.max_batch, "max_tokens": args.max_tokens,
                     "cpu_count": os.cpu_count(), "warmup_s": round(warm_s, 1),
                     "levels": levels}
    _results.write(args, "serve_load", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
