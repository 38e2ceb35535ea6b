"""Training data: JSONL documents, tokenized, packed into fixed-length rows.

One JSON object per line, of one of three kinds:

    {"text": "..."}                           plain text: BOS + tokens + EOS, every token trained
    {"messages": [...], "tools": [...]}       a conversation in K2 Thinking's chat template;
                                              its final reasoning chain (reasoning, content,
                                              tool calls, closing <|im_end|>) is trained
                                              (see `encode_chat`)
    {"input_ids": [...], "loss_mask": [...]}  pre-tokenized; loss_mask defaults to all ones

A document of n tokens gives n-1 (input, target) pairs. Pairs are packed back to back into rows of
`seq_len`: each piece of a document in a row gets its own segment id (1, 2, ... within the row;
attention never crosses segments) and positions restarting at 0. A document that does not fit
continues in the next row as a new piece. Rows are always full: the stream wraps into the next
epoch, whose document order is a fresh permutation drawn from `(seed, epoch)`. With
`whole_documents`, a document that fits a row but not what is left of it starts the next row
instead, and the rest of the row is padding (segment id 0, weight 0): every trained token then
sees its whole document, at the price of the padding (documents longer than a row still split).

`JsonlCorpus.validate` encodes every record once before a run starts, so that a bad line is
reported as `PATH:LINE: what is wrong` in seconds, before anything is compiled or written.

The global batch of B rows is B streams (`BatchStreams`): row r of every step comes from stream
r, which packs its own share of each epoch's order (documents r, r + B, r + 2B, ...). A process
packs only the rows its devices hold, so hosts read disjoint data, and the batch does not depend
on how many processes share it: one process packing every row builds the same global batch.
A stream's position, `(epoch, index, offset)` (document `index` of its share of the epoch's
order, pair `offset` inside it), is all the state there is; a checkpoint stores every stream's
and each process resumes its own exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np

from k2jax.text import chat_template
from k2jax.text import special_tokens as st
from k2jax.text.tokenizer import TIKTOKEN_FILE_NAME, TOKENIZER_CONFIG_FILE_NAME, K2Tokenizer

BATCH_FIELDS = ("tokens", "targets", "weights", "segment_ids", "positions")


class DataError(ValueError):
    """A corpus or tokenizer that cannot be trained on (bad record, mismatched vocabulary)."""


def byte_tokenizer() -> K2Tokenizer:
    """K2's tokenizer layout over the 256 bytes alone: ids 0..255 are bytes, 256..511 K2's
    control tokens. Needs no file; fits any model with a vocabulary of at least 512."""
    return K2Tokenizer({bytes([b]): b for b in range(256)}, name="k2jax-bytes")


def load_tokenizer(spec: str | None, checkpoint: str | None = None) -> K2Tokenizer:
    """`"bytes"`, a `tiktoken.model` file or a directory holding one. None means the
    checkpoint directory's own `tiktoken.model` when fine-tuning a checkpoint (an error if it
    has none: its vocabulary is not the bytes'), and bytes for a preset."""
    if spec is None and checkpoint is not None:
        if not os.path.isfile(os.path.join(checkpoint, "tiktoken.model")):
            raise DataError(f"{checkpoint} holds no tiktoken.model; pass --tokenizer")
        spec = checkpoint
    spec = spec or "bytes"
    if spec == "bytes":
        return byte_tokenizer()
    if not os.path.exists(spec):
        raise DataError(f"tokenizer {spec}: no such file or directory")
    return K2Tokenizer.from_file(spec)


def tokenizer_files(spec: str | None, checkpoint: str | None = None) -> list[str]:
    """The files of the tokenizer `load_tokenizer(spec, checkpoint)` reads (none for bytes):
    its `tiktoken.model` and the `tokenizer_config.json` beside it, if any. An export carries
    them, so that it serves with the vocabulary it was trained on."""
    spec = spec if spec is not None else checkpoint
    if spec is None or spec == "bytes":
        return []
    model = os.path.join(spec, TIKTOKEN_FILE_NAME) if os.path.isdir(spec) else spec
    config = os.path.join(os.path.dirname(model), TOKENIZER_CONFIG_FILE_NAME)
    return [model] + ([config] if os.path.isfile(config) else [])


@dataclasses.dataclass(frozen=True)
class Document:
    """`tokens` int32 `[n]` and `mask` float32 `[n]`: 1 where the token is a training target."""

    tokens: np.ndarray
    mask: np.ndarray


def assistant_mask(token_ids, tokenizer: K2Tokenizer, skip_turns: int = 0) -> np.ndarray:
    """1.0 on the tokens an assistant wrote, `[n]`: everything after `<|im_assistant|>NAME
    <|im_middle|>` up to and including the turn's `<|im_end|>`, except in the first
    `skip_turns` assistant turns.

    Control tokens are unambiguous here: the template is the only way they enter the ids (the
    tokenizer encodes their texts inside messages as ordinary characters).
    """
    begin, middle, end = (tokenizer.special_id(t) for t in (st.IM_ASSISTANT, st.IM_MIDDLE,
                                                              st.IM_END))
    mask = np.zeros(len(token_ids), np.float32)
    state, turns = "outside", 0
    for i, token in enumerate(token_ids):
        if state == "outside" and token == begin:
            state, turns = "header", turns + 1
        elif state == "header" and token == middle:
            state = "body"
        elif state == "body":
            mask[i] = float(turns > skip_turns)
            if token == end:
                state = "outside"
    return mask


def encode_chat(tokenizer: K2Tokenizer, messages, tools=None) -> Document:
    """A conversation as K2 Thinking sees it at inference, trained on its last reasoning chain.

    K2 Thinking's template drops the reasoning of every assistant turn up to the last one without
    tool calls, so a conversation ending in an answer is rendered as the model would be prompted
    for that answer (`messages[:-1]` plus the generation prompt) followed by the answer with its
    reasoning: `<think>REASONING</think>CONTENT<|im_end|>`. Trained are the assistant turns whose
    reasoning is rendered (the final answer and the tool-call turns leading to it); earlier turns
    appear with empty reasoning and are context only. To train every turn of a multi-turn
    conversation, write one record per turn.
    """
    messages = list(messages)
    chat_template.render_chat(messages, tools)  # validates every message, the final one too
    final = messages[-1] if messages else {}
    answers = final.get("role") == "assistant" and not final.get("tool_calls")
    context = messages[:-1] if answers else messages
    prompt = chat_template.apply_chat_template(tokenizer, context, tools,
                                               add_generation_prompt=answers)
    ids = list(prompt.token_ids)
    if answers:
        think = tokenizer.special_id(st.THINK_BEGIN)
        if ids[-1:] != [think]:  # the K2.5 formats' generation prompt already opened it
            ids.append(think)
        ids += [*tokenizer.encode(chat_template.assistant_reasoning(final) or ""),
                tokenizer.special_id(st.THINK_END),
                *tokenizer.encode(_text(final.get("content"))),
                tokenizer.special_id(st.IM_END)]
    last_plain = max((i for i, m in enumerate(context)
                      if m["role"] == "assistant" and not m.get("tool_calls")), default=-1)
    context_turns = sum(m["role"] == "assistant" for m in context[:last_plain + 1])
    tokens = np.asarray(ids, np.int32)
    return Document(tokens, assistant_mask(tokens, tokenizer, skip_turns=context_turns))


def _text(content) -> str:
    """A message's content: a string or a list of `{"type": "text", "text": ...}` parts."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part["text"] for part in content)


def encode_record(record, tokenizer: K2Tokenizer) -> Document:
    """One JSONL record (see the module docstring) as a `Document`."""
    if not isinstance(record, dict):
        raise DataError("expected a JSON object")
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError("'text' must be a string")
        ids = [tokenizer.bos_id, *tokenizer.encode(record["text"]), tokenizer.eos_id]
        return Document(np.asarray(ids, np.int32), np.ones(len(ids), np.float32))
    if "messages" in record:
        return encode_chat(tokenizer, record["messages"], record.get("tools"))
    if "input_ids" in record:
        tokens = np.asarray(record["input_ids"], np.int32)
        mask = np.asarray(record.get("loss_mask", np.ones(len(tokens))), np.float32)
        if tokens.ndim != 1 or mask.shape != tokens.shape:
            raise DataError("input_ids and loss_mask must be flat lists of equal length")
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
            raise DataError(f"input_ids outside [0, {tokenizer.vocab_size})")
        return Document(tokens, mask)
    raise DataError("a record needs 'text', 'messages' or 'input_ids'")


class JsonlCorpus:
    """Random access to the documents of a JSONL file (tokenized on first use, then cached)."""

    def __init__(self, path: str | os.PathLike, tokenizer: K2Tokenizer, cache_size: int = 65536):
        self.path = os.fspath(path)
        self.tokenizer = tokenizer
        self._offsets, self._lines = [], []
        try:
            with open(self.path, "rb") as f:
                offset = 0
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        self._offsets.append(offset)
                        self._lines.append(number)
                    offset += len(line)
        except FileNotFoundError:
            raise DataError(f"{self.path}: no such file") from None
        if not self._offsets:
            raise DataError(f"{self.path}: no records")
        self.document = functools.lru_cache(maxsize=cache_size)(self._read)

    def __len__(self) -> int:
        return len(self._offsets)

    def validate(self) -> None:
        """Reads and encodes every record once (filling the document cache), so that a bad line
        stops a run before it compiles or writes anything rather than steps into training.

        Raises `DataError` naming the first bad line (`PATH:LINE: what is wrong`), or when no
        document has the two tokens one (input, target) pair needs.
        """
        if max(len(self.document(i).tokens) for i in range(len(self))) < 2:
            raise DataError(f"{self.path}: no document has two tokens")

    def _read(self, i: int) -> Document:
        with open(self.path, "rb") as f:
            f.seek(self._offsets[i])
            line = f.readline()
        where = f"{self.path}:{self._lines[i]}"
        try:
            record = json.loads(line.strip())
        except UnicodeDecodeError:
            raise DataError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
        try:
            return encode_record(record, self.tokenizer)
        except KeyError as e:
            raise DataError(f"{where}: missing field {e}") from None
        except (DataError, ValueError, TypeError) as e:
            raise DataError(f"{where}: {e}") from None


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the stream stands: pair `offset` of document `index` of epoch `epoch`'s order."""

    epoch: int = 0
    index: int = 0
    offset: int = 0


class Packer:
    """Deterministic stream of packed rows over a corpus (see the module docstring): with
    `num_streams > 1`, stream `stream` of them, over its share of each epoch's order."""

    def __init__(self, corpus: JsonlCorpus, seq_len: int, seed: int,
                 position: DataPosition = DataPosition(), *, stream: int = 0,
                 num_streams: int = 1, whole_documents: bool = False):
        self.corpus, self.seq_len, self.seed = corpus, seq_len, seed
        self.whole_documents = whole_documents
        self.position = position
        self.stream, self.num_streams = stream, num_streams
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        """This stream's share of `epoch`'s document order, drawn once per epoch (a batch's
        streams each pack one row per step: redrawing it per row would cost a permutation of
        the corpus per row)."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.corpus))
            # With fewer documents than streams, stream r takes document r mod n alone.
            self._epoch_order = epoch, order[self.stream % len(order)::self.num_streams]
        return self._epoch_order[1]

    def rows(self, count: int) -> dict[str, np.ndarray]:
        """The next `count` rows: each of `BATCH_FIELDS` as `[count, seq_len]`."""
        t = self.seq_len
        out = {name: np.zeros((count, t), np.float32 if name == "weights" else np.int32)
               for name in BATCH_FIELDS}
        epoch, index, offset = dataclasses.astuple(self.position)
        order = self._order(epoch)
        for row in range(count):
            filled, segment, idle = 0, 0, 0
            while filled < t:
                doc = self.corpus.document(int(order[index]))
                pairs = len(doc.tokens) - 1 - offset
                if self.whole_documents and filled and t - filled < pairs <= t:
                    break  # it starts the next row; the rest of this one is padding
                take = min(t - filled, pairs)
                if take > 0:
                    segment += 1
                    piece = slice(filled, filled + take)
                    out["tokens"][row, piece] = doc.tokens[offset:offset + take]
                    out["targets"][row, piece] = doc.tokens[offset + 1:offset + take + 1]
                    out["weights"][row, piece] = doc.mask[offset + 1:offset + take + 1]
                    out["segment_ids"][row, piece] = segment
                    out["positions"][row, piece] = np.arange(take)
                    filled, offset, idle = filled + take, offset + take, 0
                if offset >= len(doc.tokens) - 1:
                    index, offset, idle = index + 1, 0, idle + 1
                    if idle > len(self.corpus):  # a stream's shares may be short for a while
                        if max(len(self.corpus.document(i).tokens)
                               for i in range(len(self.corpus))) < 2:
                            raise DataError(f"{self.corpus.path}: no document has two tokens")
                        idle = 0
                    if index == len(order):
                        epoch, index = epoch + 1, 0
                        order = self._order(epoch)
        self.position = DataPosition(epoch, index, offset)
        return out

    def state(self) -> dict:
        """JSON-serialisable position, stored in every checkpoint."""
        return {**dataclasses.asdict(self.position), "seed": self.seed,
                "num_documents": len(self.corpus), "seq_len": self.seq_len}

    def restore(self, state: dict) -> None:
        if (state["seed"], state["num_documents"], state["seq_len"]) != (
                self.seed, len(self.corpus), self.seq_len):
            raise DataError(
                f"checkpointed data stream (seed {state['seed']}, {state['num_documents']} "
                f"documents, seq_len {state['seq_len']}) does not match this run's "
                f"(seed {self.seed}, {len(self.corpus)} documents, seq_len {self.seq_len})")
        self.position = DataPosition(state["epoch"], state["index"], state["offset"])


class BatchStreams:
    """The global batch of `batch_size` rows, row r from stream r (see the module docstring);
    this process packs `rows` (default all), the others stay zero."""

    def __init__(self, corpus: JsonlCorpus, seq_len: int, seed: int, batch_size: int,
                 rows=None, whole_documents: bool = False):
        self.corpus, self.seq_len, self.seed, self.batch_size = corpus, seq_len, seed, batch_size
        rows = range(batch_size) if rows is None else sorted(rows)
        self.packers = {r: Packer(corpus, seq_len, seed, stream=r, num_streams=batch_size,
                                  whole_documents=whole_documents)
                        for r in rows}

    def next_batch(self) -> dict[str, np.ndarray]:
        """The next step's `[batch_size, seq_len]` rows (this process's rows filled)."""
        out = {name: np.zeros((self.batch_size, self.seq_len),
                              np.float32 if name == "weights" else np.int32)
               for name in BATCH_FIELDS}
        for row, packer in self.packers.items():
            packed = packer.rows(1)
            for name in BATCH_FIELDS:
                out[name][row] = packed[name][0]
        return out

    def positions(self) -> np.ndarray:
        """`[batch_size, 3]` int64 `(epoch, index, offset)` of this process's streams, -1 for
        the streams of other processes (so that a maximum over processes combines them)."""
        table = np.full((self.batch_size, 3), -1, np.int64)
        for row, packer in self.packers.items():
            table[row] = dataclasses.astuple(packer.position)
        return table

    def state(self, positions: np.ndarray | None = None) -> dict:
        """JSON-serialisable positions of every stream (`positions`, combined over processes;
        default this process's own), stored in every checkpoint."""
        table = self.positions() if positions is None else np.asarray(positions)
        if (table < 0).any():
            raise ValueError("the data state needs every stream's position")
        return {"seed": self.seed, "num_documents": len(self.corpus), "seq_len": self.seq_len,
                "batch_size": self.batch_size, "streams": table.tolist()}

    def restore(self, state: dict) -> None:
        saved = (state.get("seed"), state.get("num_documents"), state.get("seq_len"),
                 state.get("batch_size"))
        if saved != (self.seed, len(self.corpus), self.seq_len, self.batch_size) or (
                len(state.get("streams") or ()) != self.batch_size):
            raise DataError(
                f"checkpointed data streams (seed {saved[0]}, {saved[1]} documents, seq_len "
                f"{saved[2]}, batch {saved[3]}) do not match this run's (seed {self.seed}, "
                f"{len(self.corpus)} documents, seq_len {self.seq_len}, batch "
                f"{self.batch_size})")
        for row, packer in self.packers.items():
            packer.position = DataPosition(*map(int, state["streams"][row]))


def micro_batches(rows: dict[str, np.ndarray], grad_accum: int) -> dict[str, np.ndarray]:
    """`[B, T]` rows -> `[A, B/A, T]`: micro-batch a holds rows `a*B/A .. (a+1)*B/A - 1`."""
    return {k: v.reshape(grad_accum, v.shape[0] // grad_accum, *v.shape[1:])
            for k, v in rows.items()}
