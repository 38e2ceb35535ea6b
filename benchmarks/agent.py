"""The thinking agent end to end, and INT4 QAT against plain post-training quantization.

    python -m benchmarks.agent [--dir runs/agent] [--steps 300] [--tasks 50] [--write]

Builds the synthetic agentic corpus and its tokenizer, trains the `agent` preset twice from the
same initialisation and data order with `k2jax train` (INT4 QAT on the routed experts, and
float), quantizes the float model's routed experts to INT4 after training, round-trips the QAT
export through `k2jax convert --to hf` and back (bit-exact), then serves each of the three
models with `k2jax serve` and runs the agent of `examples/agent.py` (the `openai` client, greedy)
on the same held-out tasks. Prints the success rates, writes the loss curves to DIR/loss.png
(with matplotlib) and JSON with --write / --json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import time

from benchmarks import _results
from examples import agent, agent_pipeline as pipeline, agent_tasks

MODELS = (("QAT, INT4 export", "qat-int4-roundtrip"), ("float", "float"),
          ("float + INT4 after training", "ptq-int4"))


def read_losses(run_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def plot(curves: dict[str, list[tuple[int, float]]], path: str) -> str | None:
    """The training loss curves as a PNG; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        axes.plot(*zip(*points), label=label)
    axes.set(xlabel="step", ylabel="training loss (assistant tokens)", yscale="log",
             title="agent preset: INT4 QAT vs float")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="runs/agent-benchmark",
                        help="work directory (replaced)")
    parser.add_argument("--count", type=int, default=4000, help="training conversations")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--tasks", type=int, default=50, help="held-out tasks per model")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the models DIR already holds; redo the stages after training")
    _results.add_arguments(parser, "agent")
    args = parser.parse_args(argv)

    path = lambda *names: os.path.join(args.dir, *names)  # noqa: E731
    times = path("train_seconds.json")
    if args.reuse and os.path.exists(times):
        with open(times) as f:
            seconds = json.load(f)
        print(f"reusing the trained models in {args.dir}", flush=True)
    else:
        shutil.rmtree(args.dir, ignore_errors=True)
        corpus, tokenizer = pipeline.prepare(args.dir, args.count)
        seconds = {}
        for name, qat in (("qat", True), ("float", False)):
            began = time.perf_counter()
            export = path("qat-int4" if qat else "float")
            pipeline.k2jax(*pipeline.train_arguments(
                corpus, tokenizer, path("run-" + name), export, qat=qat, steps=args.steps,
                batch_size=args.batch_size, learning_rate=args.learning_rate))
            seconds[name] = time.perf_counter() - began
            print(f"trained {name} in {seconds[name]:.0f} s -> {export}", flush=True)
        with open(times, "w") as f:
            json.dump(seconds, f)
    for stage in ("ptq-int4", "qat-int4-hf", "qat-int4-roundtrip"):
        shutil.rmtree(path(stage), ignore_errors=True)
    pipeline.quantize(path("float"), path("ptq-int4"))
    pipeline.round_trip(path("qat-int4"), path("qat-int4-hf"), path("qat-int4-roundtrip"))
    print("round trip through the hub format: bit-exact", flush=True)

    import openai

    heldout = agent_tasks.tasks("heldout", args.tasks)
    rows = []
    for label, directory in MODELS:
        with open(path(directory + ".serve.log"), "w") as log, \
                pipeline.serving(path(directory), log=log) as url:
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
            began = time.perf_counter()
            outcomes = agent.evaluate(client, client.models.list().data[0].id, heldout)
            elapsed = time.perf_counter() - began
        by_kind = collections.defaultdict(list)
        for task, outcome in zip(heldout, outcomes):
            by_kind[task.kind].append(outcome.success)
        rows.append({
            "model": label, "checkpoint": path(directory), "tasks": len(outcomes),
            "success": sum(o.success for o in outcomes) / len(outcomes),
            "tool_calls": sum(o.calls for o in outcomes),
            "by_kind": {k: sum(v) / len(v) for k, v in by_kind.items()},
            "failures": [o.problem for o in outcomes if not o.success][:10],
            "eval_seconds": elapsed})
        print(f"{label}: {100 * rows[-1]['success']:.1f}% in {elapsed:.0f} s", flush=True)

    curves = {"INT4 QAT": read_losses(path("run-qat")), "float": read_losses(path("run-float"))}
    figure = plot(curves, path("loss.png"))
    kinds = list(agent_tasks.KINDS)
    print(f"\n{len(heldout)} held-out tasks, greedy; success = right final answer and every "
          "tool call well formed")
    print(f"{'model':<30} {'success':>8} {'calls':>6}  " + " ".join(f"{k:>11}" for k in kinds))
    for row in rows:
        print(f"{row['model']:<30} {100 * row['success']:>7.1f}% {row['tool_calls']:>6}  "
              + " ".join(f"{100 * row['by_kind'].get(k, 0):>10.0f}%" for k in kinds))
    print(f"\ntraining ({args.steps} steps of {args.batch_size} x {pipeline.SEQ_LEN} tokens): QAT "
          f"{seconds['qat']:.0f} s, float {seconds['float']:.0f} s; final loss QAT "
          f"{curves['INT4 QAT'][-1][1]:.4f}, float {curves['float'][-1][1]:.4f}")
    print(f"loss curves: {figure or 'not plotted (pip install matplotlib)'}")
    _results.write(args, "agent", {
        "steps": args.steps, "batch_size": args.batch_size, "corpus": args.count,
        "train_seconds": seconds, "final_loss": {k: v[-1][1] for k, v in curves.items()},
        "models": rows, "loss_plot": figure})


if __name__ == "__main__":
    main()
