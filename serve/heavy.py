"""Heavy mode: several candidate answers in parallel, then one answer written from them.

For a chat request with `"heavy": {"n": N}` (HTTP; the `openai` client passes it through
`extra_body`) or `generate(..., heavy=N)`:

1. Candidates: the conversation is generated N times at once, as one engine request with
   `n=N`, so the N trajectories share the cached prompt (the engine's prefix sharing) and only
   their outputs take new cache pages. They use the request's sampling parameters.
2. Aggregation: the model is shown the conversation again followed by one more user turn,
   `aggregation_messages`, which quotes each candidate's answer (its content and tool calls;
   reasoning is left out, as it can be tens of thousands of tokens) under the instructions in
   `AGGREGATION_INSTRUCTIONS`. What it generates there is the response: its reasoning, content
   and tool calls, with the request's `n`, `max_tokens` and sampling parameters.

The usage reported counts both passes: prompt tokens of the candidates' prompt plus the
aggregation prompt, completion tokens of all candidates plus the final answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

AGGREGATION_INSTRUCTIONS = (
    "Above are {n} candidate replies to the conversation. Check them, then write the single best "
    "final reply (pick one, or combine and correct them). Reply directly; do not mention the "
    "candidates.")


def candidate_text(content: str | None, tool_calls: Sequence[Mapping]) -> str:
    """A candidate as the aggregation turn quotes it: its content, then its tool calls."""
    parts = [content] if content else []
    for call in tool_calls:
        function = call["function"]
        parts.append(f"Tool call: {function['name']}({function['arguments']})")
    return "\n".join(parts) or "(empty reply)"


def aggregation_messages(messages: Sequence[Mapping], candidates: Sequence[Mapping]) -> list[dict]:
    """The conversation plus the aggregation turn.

    Args:
      messages: the request's OpenAI chat messages.
      candidates: the candidates as parsed assistant messages (`content`, `tool_calls`).
    Returns:
      `messages` followed by one user message: each candidate under `## Candidate i`, then
      `AGGREGATION_INSTRUCTIONS`.
    """
    quoted = [f"## Candidate {i}\n{candidate_text(c.get('content'), c.get('tool_calls') or ())}"
              for i, c in enumerate(candidates, start=1)]
    turn = "\n\n".join(quoted + [AGGREGATION_INSTRUCTIONS.format(n=len(candidates))])
    return [*messages, {"role": "user", "content": turn}]

