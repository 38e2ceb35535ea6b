"""A thinking agent over the OpenAI API: sends the tools, runs the calls the model makes on the
client side, sends the results back with the assistant's reasoning kept in the history (K2
Thinking reasons between calls and needs its earlier reasoning of the same task), and stops at
the first answer without tool calls.

    k2jax serve --checkpoint runs/agent/qat-int4 --port 8000 &
    python -m examples.agent --base-url http://127.0.0.1:8000/v1 "What is 17 times the population of Calder?"
    python -m examples.agent --base-url http://127.0.0.1:8000/v1 --heldout 50

The tools are those of `examples.agent_tasks` (a calculator, a table look-up, a unit converter);
`--heldout N` runs N held-out tasks concurrently and prints the success rate.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import sys

from examples import agent_tasks

MAX_TURNS = 6


@dataclasses.dataclass
class Transcript:
    """One agent run: the message history, every `(name, arguments)` call in order, the final
    answer's content (None if the run hit `max_turns` or the length limit first)."""

    messages: list[dict]
    calls: list[tuple[str, str]]
    answer: str | None


def reasoning_of(message) -> str | None:
    """The reasoning of an `openai` response message: k2jax sends it as `reasoning_content`
    (and `reasoning`), fields the client keeps as extras."""
    extra = message.model_extra or {}
    return extra.get("reasoning_content") or extra.get("reasoning")


def run_agent(client, model: str, question: str, *, tools=agent_tasks.TOOLS,
              execute=agent_tasks.run_tool, max_turns: int = MAX_TURNS,
              max_tokens: int = 256) -> Transcript:
    """Runs one task to its answer with greedy decoding."""
    messages: list[dict] = [{"role": "user", "content": question}]
    calls: list[tuple[str, str]] = []
    for _ in range(max_turns):
        choice = client.chat.completions.create(
            model=model, messages=messages, tools=tools, temperature=0,
            max_tokens=max_tokens).choices[0]
        message = choice.message
        turn = {"role": "assistant", "content": message.content or "",
                "reasoning_content": reasoning_of(message) or ""}
        if not message.tool_calls:
            messages.append(turn)
            return Transcript(messages, calls,
                              message.content if choice.finish_reason == "stop" else None)
        turn["tool_calls"] = [{"id": call.id, "type": "function",
                               "function": {"name": call.function.name,
                                            "arguments": call.function.arguments}}
                              for call in message.tool_calls]
        messages.append(turn)
        for call in message.tool_calls:
            calls.append((call.function.name, call.function.arguments))
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": execute(call.function.name, call.function.arguments)})
    return Transcript(messages, calls, None)


def evaluate(client, model: str, tasks, concurrency: int = 8) -> list[agent_tasks.Outcome]:
    """Runs every task (`concurrency` at a time, so that the server batches them) and grades
    it; outcomes in task order."""
    def one(task):
        transcript = run_agent(client, model, task.question)
        return agent_tasks.grade(task, transcript.answer, transcript.calls)

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, tasks))


def main(argv: list[str] | None = None) -> int:
    import openai

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("question", nargs="?", help="one question to answer")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", help="model id (default: the server's first)")
    parser.add_argument("--heldout", type=int, metavar="N", help="evaluate N held-out tasks")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    if (args.question is None) == (args.heldout is None):
        parser.error("give a question or --heldout N")
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    model = args.model or client.models.list().data[0].id
    if args.question is not None:
        transcript = run_agent(client, model, args.question)
        for message in transcript.messages:
            if message.get("reasoning_content"):
                print(f"[{message['role']} thinks] {message['reasoning_content']}")
            for call in message.get("tool_calls", ()):
                print(f"[call] {call['function']['name']}({call['function']['arguments']})")
            if message.get("content"):
                print(f"[{message['role']}] {message['content']}")
        return 0 if transcript.answer is not None else 1
    outcomes = evaluate(client, model, agent_tasks.tasks("heldout", args.heldout),
                        args.concurrency)
    succeeded = sum(o.success for o in outcomes)
    print(f"{succeeded}/{len(outcomes)} held-out tasks solved "
          f"({100 * succeeded / len(outcomes):.1f}%)")
    for outcome in outcomes:
        if not outcome.success:
            print(f"  failed: {outcome.problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
