"""A stand-in for `serve.engine.Engine` whose outputs are scripted, for server tests that need
exact outputs (tool calls, reasoning) or slow ones (disconnects) without running a model.

Each completion emits its scripted tokens one per `step()`, honouring `max_new_tokens` and stop
ids as the engine does; text is the tokenizer's decode, as the server's engine produces it.
"""

import itertools
import threading
import time
import types

from serve import chat
from serve.engine import Completion, GenerationResult, StreamDelta


def token_ids(tokenizer, *parts: str) -> list[int]:
    """Ids of `parts`: a special token's text becomes that token, anything else is encoded."""
    ids = []
    for part in parts:
        if part in tokenizer.special_tokens:
            ids.append(tokenizer.special_id(part))
        else:
            ids.extend(tokenizer.encode(part))
    return ids


class ScriptedEngine:
    """`script(prompt_ids, params, index) -> token ids` gives each completion's output.

    `prompts` records every prompt added, `aborted` every request id aborted; `step_delay`
    seconds pass in each step; `fail_with` makes `step` raise it.
    """

    def __init__(self, tokenizer, script, *, step_delay: float = 0.0):
        self.config = types.SimpleNamespace(vocab_size=tokenizer.vocab_size)
        self.detokenize = chat.detokenizer(tokenizer)
        self.script, self.step_delay = script, step_delay
        self.prompts: list[list[int]] = []
        self.aborted: list[int] = []
        self.fail_with: Exception | None = None
        self.steps = 0
        self._requests: dict[int, tuple[list[int], list[dict]]] = {}
        self._ids = itertools.count()
        self.lock = threading.Lock()

    def add_request(self, prompt_ids, params) -> int:
        if not prompt_ids:
            raise ValueError("empty prompt")
        request_id = next(self._ids)
        with self.lock:
            self.prompts.append(list(prompt_ids))
        seqs = [{"index": i, "params": params, "script": list(self.script(prompt_ids, params, i)),
                 "generated": [], "sent": 0, "finish": None} for i in range(params.n)]
        self._requests[request_id] = (list(prompt_ids), seqs)
        return request_id

    def has_unfinished(self) -> bool:
        return any(s["finish"] is None for _, seqs in self._requests.values() for s in seqs)

    def is_finished(self, request_id: int) -> bool:
        return all(s["finish"] is not None for s in self._requests[request_id][1])

    def pop_result(self, request_id: int) -> GenerationResult:
        prompt, seqs = self._requests.pop(request_id)
        return GenerationResult(request_id, prompt, [
            Completion(s["index"], s["generated"], self.detokenize(s["generated"]), s["finish"])
            for s in seqs])

    def pop_failures(self) -> dict[int, Exception]:
        return {}  # scripted outputs cannot fail one request alone

    def abort(self, request_id: int) -> None:
        with self.lock:
            self.aborted.append(request_id)
        self._requests.pop(request_id, None)

    def step(self) -> list[StreamDelta]:
        time.sleep(self.step_delay)
        self.steps += 1
        if self.fail_with is not None:
            raise self.fail_with
        deltas = []
        for request_id, (_, seqs) in self._requests.items():
            for seq in seqs:
                if seq["finish"] is None:
                    deltas.append(self._advance(request_id, seq))
        return deltas

    def _advance(self, request_id: int, seq: dict) -> StreamDelta:
        params = seq["params"]
        token = seq["script"][len(seq["generated"])]
        seq["generated"].append(token)
        if token in params.stop_token_ids or len(seq["generated"]) == len(seq["script"]):
            seq["finish"] = "stop"
        elif len(seq["generated"]) >= params.max_new_tokens:
            seq["finish"] = "length"
        text = self.detokenize(seq["generated"])
        delta, seq["sent"] = text[seq["sent"]:], len(text)
        return StreamDelta(request_id, seq["index"], [token], None, delta, seq["finish"])
