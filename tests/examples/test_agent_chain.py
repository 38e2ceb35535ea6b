"""The thinking agent's whole chain, shortened: corpus and tokenizer, `k2jax train` with INT4
QAT, the export, `k2jax convert --to hf` and back, `k2jax serve` on the result and the agent loop
of `examples/agent.py` through the `openai` client.

The model trains on two conversations until it has learned them (a two-step look-up then
arithmetic, and two parallel look-ups then arithmetic), so that served greedily it makes their
tool calls; what is asserted is that every stage hands the next a valid artifact and that the
agent loop runs to an answer with well-formed calls, not the held-out accuracy
(`benchmarks/agent.py` measures that).
"""

import json
import os
import struct

import openai
import pytest

from examples import agent, agent_pipeline as pipeline, agent_tasks

STEPS = 200
# The stages run as `k2jax` subprocesses on one CPU device, as a user's shell runs them (this
# process forces eight for the sharding tests), each under a hard time limit.
ONE_DEVICE = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def _scalars(run_dir):
    """`{tag: [values]}` of the TensorBoard event files (TFRecords of `Event` protos)."""
    from tensorboardX.proto import event_pb2

    directory = os.path.join(run_dir, "tensorboard")
    scalars = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            while header := f.read(12):
                (length,) = struct.unpack("<Q", header[:8])
                event = event_pb2.Event.FromString(f.read(length))
                f.read(4)
                for value in event.summary.value:
                    scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


def test_train_export_convert_serve_and_run_the_agent(tmp_path):
    learned = [t for t in agent_tasks.tasks("train", 5) if t.kind in ("lookup_calc", "compare")]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(t.record()) + "\n" for t in learned))
    tokenizer = agent_tasks.write_tokenizer(str(tmp_path / "tokenizer"), 768)

    run, export = tmp_path / "run", tmp_path / "qat-int4"
    pipeline.k2jax(*pipeline.train_arguments(
        str(corpus), tokenizer, str(run), str(export), qat=True, steps=STEPS, batch_size=8,
        learning_rate=5e-3, warmup_steps=10), env=ONE_DEVICE, timeout=400)
    losses = [json.loads(line)["loss"] for line in open(run / "metrics.jsonl")]
    assert losses[-1] < 0.05 * losses[0]
    events = _scalars(str(run))
    assert len(events["loss"]) == len(losses) and events["loss"][-1] == pytest.approx(losses[-1])
    config = json.loads((export / "config.json").read_text())
    assert config["quantized_linears"] == ["routed_experts"]
    assert (export / "tiktoken.model").read_bytes() == open(tokenizer, "rb").read()

    back = tmp_path / "qat-int4-back"
    pipeline.round_trip(str(export), str(tmp_path / "hub"), str(back),
                        env=ONE_DEVICE, timeout=120)  # raises unless bit-exact
    assert (tmp_path / "hub" / "model.safetensors.index.json").exists() or any(
        p.suffix == ".safetensors" for p in (tmp_path / "hub").iterdir())

    with pipeline.serving(str(back), max_batch=2, timeout=240, env=ONE_DEVICE) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        for task in learned:
            transcript = agent.run_agent(client, model, task.question)
            assert transcript.answer is not None, transcript.messages
            assert len(transcript.calls) == sum(len(step) for step in task.steps)
            assert [agent_tasks.call_problem(n, a) for n, a in transcript.calls] == [None] * len(
                transcript.calls)
            reasoning = [m["reasoning_content"] for m in transcript.messages
                         if m["role"] == "assistant"]
            assert all(reasoning), transcript.messages
