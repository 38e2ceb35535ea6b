"""The Kimi K2 tokenizer: K2's byte-level BPE (`tiktoken.model`) run by tiktoken with K2's
pre-tokenizer pattern and its 256 special-token slots.

`encode` turns text into ordinary tokens only: a user who types `<|im_end|>` gets the characters,
never the control token (the released tokenizer allows every special token, which lets user text
forge turns). Control tokens enter a prompt only through the chat template, by name
(`special_id`). `decode` and `IncrementalDetokenizer` turn ids back into text; with
`skip_special_tokens=True` they still keep the reasoning and tool-call markers the parsers read.
"""

import base64
import codecs
import json
import os
import re
from collections.abc import Iterable, Mapping

import tiktoken

from k2jax.text import special_tokens as st
from k2jax.text.chat_formats import K2_THINKING, chat_format_of_directory

# K2's pre-tokenizer. `&&` is character-class intersection: tiktoken's engine reads it as such,
# the `regex` package only with its V1 flag, and the standard `re` module not at all.
PRETOKENIZE_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# tiktoken's BPE is quadratic in the length of one pre-token, so K2's tokenizer encodes long text
# in chunks and cuts runs of whitespace or of non-whitespace longer than the limit; the same cuts
# here keep the token ids identical to the released tokenizer's on such input.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (MAX_RUN_CHARS + 1, MAX_RUN_CHARS + 1))

TIKTOKEN_FILE_NAME = "tiktoken.model"
TOKENIZER_CONFIG_FILE_NAME = "tokenizer_config.json"
# The fields of tokenizer_config.json that name a role's token (a string, or an AddedToken
# dict `{"content": ...}` as transformers may write it).
_ROLE_FIELDS = {"bos_token": "bos_id", "eos_token": "eos_id", "pad_token": "pad_id",
                "unk_token": "unk_id"}


def load_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Reads a tiktoken BPE file (`BASE64 RANK` per line) into `{token_bytes: rank}`.

    This is the format `tiktoken.load.load_tiktoken_bpe` reads; that function also caches files by
    path under the temp dir, which serves stale ranks once the file at a path changes, so local
    files are parsed here directly. Ranks must be exactly 0..n-1.
    """
    ranks = {}
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{line_number}: expected 'BASE64 RANK', got {line!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be unique and cover 0..{len(ranks) - 1}")
    return ranks


def _encode_pieces(text: str) -> Iterable[str]:
    """Splits text where K2's tokenizer does before BPE (see MAX_ENCODE_CHARS)."""
    for chunk_start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[chunk_start:chunk_start + MAX_ENCODE_CHARS]
        piece_start = 0
        for run in _LONG_RUN.finditer(chunk):
            for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[piece_start:cut]
                piece_start = cut
        yield chunk[piece_start:]


class K2Tokenizer:
    """K2's tokenizer over any base vocabulary in the `tiktoken.model` format.

    Special tokens occupy the 256 ids after the base ranks, laid out as in K2 (see
    `k2jax.text.special_tokens`): with the released file, `[BOS]` is 163584 and `vocab_size` 163840.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], name: str = "kimi-k2",
                 special_token_names: Mapping[int, str] | None = None):
        """`special_token_names`: `{id: text}` of the named special tokens (the checkpoint's
        `added_tokens_decoder`); default K2's own layout. Unnamed slots are reserved tokens."""
        self.num_base_tokens = len(mergeable_ranks)
        self.special_tokens = (st.special_tokens_for(self.num_base_tokens)
                               if special_token_names is None else
                               _special_tokens_named(self.num_base_tokens, special_token_names))
        self.vocab_size = self.num_base_tokens + st.NUM_SPECIAL_SLOTS
        self._encoding = tiktoken.Encoding(
            name, pat_str=PRETOKENIZE_PATTERN, mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens, explicit_n_vocab=self.vocab_size)
        self._special_names = {token_id: text for text, token_id in self.special_tokens.items()}
        self._mergeable_ranks = mergeable_ranks
        self.bos_id = self.special_tokens.get(st.BOS)
        self.eos_id = self.special_tokens.get(st.EOS)
        self.im_end_id = self.special_tokens.get(st.IM_END)
        self.pad_id = self.special_tokens.get(st.PAD)
        self.unk_id = self.special_tokens.get(st.UNK)
        # The most bytes (so characters) one token covers: a bound that lets a server refuse
        # text too long for its prompt limit without tokenizing it.
        self.max_token_bytes = max(
            max(map(len, mergeable_ranks), default=1),
            max((len(t.encode()) for t in self.special_tokens), default=1))
        # The chat template the checkpoint was trained with (`k2jax.text.chat_formats`), as HF
        # tokenizers carry theirs; `from_file` reads it from the checkpoint directory.
        self.chat_format = K2_THINKING
        self._skipped_ids = frozenset(
            token_id for text, token_id in self.special_tokens.items()
            if text not in st.KEPT_WHEN_SKIPPING_SPECIALS)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "K2Tokenizer":
        """Loads `tiktoken.model`, given as the file or the directory that holds it, with the
        special tokens of the `tokenizer_config.json` beside it (K2's layout without one) and
        the chat format of the template beside it (K2 Thinking's without one)."""
        if os.path.isdir(path):
            path = os.path.join(path, TIKTOKEN_FILE_NAME)
        directory = os.path.dirname(os.path.abspath(path))
        tokenizer = cls._from_files(path, os.path.join(directory, TOKENIZER_CONFIG_FILE_NAME))
        tokenizer.chat_format = chat_format_of_directory(directory) or K2_THINKING
        return tokenizer

    @classmethod
    def _from_files(cls, path: str, config_path: str) -> "K2Tokenizer":
        if not os.path.isfile(config_path):
            return cls(load_ranks(path))
        ranks = load_ranks(path)
        names, roles = read_tokenizer_config(config_path)
        try:
            tokenizer = cls(ranks, special_token_names=names)
        except ValueError as e:
            raise ValueError(f"{config_path}: {e}") from None
        for field, token in roles.items():
            if token not in tokenizer.special_tokens:
                raise ValueError(f"{config_path}: {field} {token!r} is not among the special "
                                 "tokens of added_tokens_decoder")
            setattr(tokenizer, _ROLE_FIELDS[field], tokenizer.special_tokens[token])
        return tokenizer

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Where generation stops: `<|im_end|>`, then the EOS token (each once, if present)."""
        return tuple(dict.fromkeys(i for i in (self.im_end_id, self.eos_id) if i is not None))

    @property
    def tiktoken_encoding(self) -> tiktoken.Encoding:
        """The underlying `tiktoken.Encoding` (for libraries that build on it, such as
        constrained-decoding grammars); its special tokens are this tokenizer's."""
        return self._encoding

    def special_id(self, token: str) -> int:
        """The id of a control token by its text, e.g. `special_id("<|im_end|>")`."""
        try:
            return self.special_tokens[token]
        except KeyError:
            raise ValueError(f"{token!r} is not a special token of this tokenizer (its "
                             "tokenizer_config.json's added_tokens_decoder does not name it)"
                             ) from None

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.num_base_tokens

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (a special token's text, UTF-8 encoded)."""
        self._check_ids([token_id])
        return self._encoding.decode_single_token_bytes(token_id)

    def id_to_token(self, token_id: int) -> str:
        """A special token's text, or a base token's bytes as text; bytes that are not valid UTF-8
        on their own (part of a character) show as backslash escapes. For display."""
        if token_id in self._special_names:
            return self._special_names[token_id]
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def token_to_id(self, token: str | bytes) -> int:
        """The id of a special token's text, or of a base token given as bytes or UTF-8 text."""
        if isinstance(token, str) and token in self.special_tokens:
            return self.special_tokens[token]
        token_bytes = token.encode("utf-8") if isinstance(token, str) else token
        try:
            return self._mergeable_ranks[token_bytes]
        except KeyError:
            raise KeyError(f"{token!r} is not a token of this tokenizer") from None

    def encode(self, text: str) -> list[int]:
        """Text to ordinary token ids; control-token texts in `text` stay ordinary text."""
        ids = []
        for piece in _encode_pieces(text):
            ids.extend(self._encoding.encode_ordinary(piece))
        return ids

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids to text; invalid UTF-8 becomes U+FFFD. Skipping keeps reasoning/tool markers."""
        return self._bytes(token_ids, skip_special_tokens).decode("utf-8", errors="replace")

    def detokenizer(self, skip_special_tokens: bool = False) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, skip_special_tokens)

    def _bytes(self, token_ids: Iterable[int], skip_special_tokens: bool) -> bytes:
        token_ids = [int(token_id) for token_id in token_ids]
        self._check_ids(token_ids)
        if skip_special_tokens:
            token_ids = [token_id for token_id in token_ids if token_id not in self._skipped_ids]
        return self._encoding.decode_bytes(token_ids)

    def _check_ids(self, token_ids: list[int]) -> None:
        for token_id in token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")


def read_tokenizer_config(path: str | os.PathLike) -> tuple[dict[int, str] | None, dict[str, str]]:
    """`({id: text} of added_tokens_decoder, or None without one; {"bos_token": text, ...})`
    from a hub `tokenizer_config.json`; raises ValueError naming the file and the field."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    roles = _role_tokens(path, config)
    table = config.get("added_tokens_decoder")
    if table is None:  # a file that names no tokens: K2's own layout
        return None, roles
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{path}: added_tokens_decoder: expected a non-empty object of "
                         "{\"ID\": {\"content\": TEXT, ...}}")
    names = {}
    for key, entry in table.items():
        if not (key.isascii() and key.isdigit()):
            raise ValueError(f"{path}: added_tokens_decoder: key {key!r} is not a token id")
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, str) or not content:
            raise ValueError(f"{path}: added_tokens_decoder[{key!r}].content: expected a "
                             "non-empty string")
        names[int(key)] = content
    return names, roles


def _role_tokens(path, config: dict) -> dict[str, str]:
    """`{"bos_token": text, ...}` of the role fields the config sets."""
    roles = {}
    for field in _ROLE_FIELDS:
        value = config.get(field)
        if isinstance(value, dict):  # an AddedToken serialised by transformers
            value = value.get("content")
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{path}: {field}: expected a string or {{\"content\": ...}}")
        roles[field] = value
    return roles


def _special_tokens_named(num_base_tokens: int, names: Mapping[int, str]) -> dict[str, int]:
    """The 256 special slots after the base ranks, named by `names` (`{id: text}`), the rest
    `<|reserved_token_N|>`, as K2's tokenizer lays them out."""
    last = num_base_tokens + st.NUM_SPECIAL_SLOTS - 1
    outside = sorted(i for i in names if not num_base_tokens <= i <= last)
    if outside:
        raise ValueError(f"added_tokens_decoder: id {outside[0]} ({names[outside[0]]!r}) is "
                         f"outside the special slots {num_base_tokens}..{last} after the "
                         f"{num_base_tokens} base ranks")
    tokens = {}
    for token_id in range(num_base_tokens, last + 1):
        text = names.get(token_id, f"<|reserved_token_{token_id}|>")
        if text in tokens:
            raise ValueError(f"added_tokens_decoder: {text!r} names both {tokens[text]} and "
                             f"{token_id}")
        tokens[text] = token_id
    return tokens


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas.

    A character whose UTF-8 bytes span several tokens is held back until its last byte arrives,
    so no delta carries a U+FFFD that the full decode would not have; the deltas joined equal
    `tokenizer.decode(all_ids, skip_special_tokens)`.
    """

    def __init__(self, tokenizer: K2Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Feeds one id or several; returns the text completed by them (possibly empty)."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self._utf8.decode(self._tokenizer._bytes(token_ids, self._skip_special_tokens))

    def finish(self) -> str:
        """Ends the stream: bytes of an unfinished character come out as U+FFFD."""
        return self._utf8.decode(b"", final=True)
