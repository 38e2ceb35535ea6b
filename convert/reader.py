"""Validated reading of a hub model directory: `config.json`, the safetensors index, the shards.

Only safetensors are read, and only by parsing: an 8-byte little-endian header length, a JSON
header `{name: {dtype, shape, data_offsets: [begin, end]}}`, then the raw tensor bytes. Opening a
directory reads every shard's header (not its data) and checks them against each other and the
index, so a truncated or corrupt shard or a stale index is reported before anything is written;
`read(name)` then reads exactly that tensor's bytes (safetensors is little-endian, as the hosts
k2jax runs on are). Pickle-based weights (`.bin`, `.pt`, ...)
are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import threading

import ml_dtypes
import numpy as np

from k2jax.config import LANGUAGE_MODEL_PREFIX, ConfigError, is_wrapper_config, text_model_config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# A header is a few MB even for 1T-parameter shards; a larger length field means corruption.
_MAX_HEADER_BYTES = 100 << 20
# What a K2.5-style wrapper holds beside its language model: the vision tower and the projector
# into the text model's width. k2jax runs the text model, so these are left out and reported.
MULTIMODAL_PREFIXES = ("vision_tower.", "mm_projector.", "multi_modal_projector.")

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ConversionError(ValueError):
    """Input that cannot be converted faithfully; `problems` name the file and tensor of each."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        shown = "; ".join(self.problems[:5])
        more = f" (and {len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        super().__init__(shown + more)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: `file` (name within the directory), dtype, shape, byte range."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str) -> tuple[dict[str, TensorInfo], list[str]]:
    """Parses one shard's header. Returns its tensors and the problems found (never raises)."""
    file = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return {}, [f"{file}: truncated: {size} bytes, too short for a safetensors header"]
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER_BYTES):
            return {}, [f"{file}: truncated or corrupt: header length {n} exceeds the "
                        f"file's {size} bytes"]
        raw = f.read(n)
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        return {}, [f"{file}: corrupt: the safetensors header is not a JSON object"]
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    tensors, problems, spans = {}, [], []
    for name, entry in header.items():
        try:
            dtype, shape, (b, e) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            assert all(isinstance(d, int) and d >= 0 for d in shape) and 0 <= b <= e
        except (KeyError, TypeError, ValueError, AssertionError):
            problems.append(f"{file}: {name}: corrupt header entry {entry!r}")
            continue
        if dtype not in DTYPES:
            problems.append(f"{file}: {name}: unknown dtype {dtype!r}")
            continue
        if e - b != math.prod(shape) * DTYPES[dtype].itemsize:
            problems.append(f"{file}: {name}: corrupt: {e - b} bytes for {dtype}{list(shape)}")
            continue
        if e > data_size:
            problems.append(f"{file}: {name}: truncated: the tensor ends at byte "
                            f"{data_start + e}, the file has {size}")
            continue
        spans.append((b, e, name))
        tensors[name] = TensorInfo(name, file, dtype, shape, data_start + b, data_start + e)
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            problems.append(f"{file}: corrupt: tensors {n0} and {n1} overlap")
    return tensors, problems


def refuse_pickle(directory: str, files) -> None:
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ConversionError(
            f"{directory}: {pickles[0]} is a pickle-based checkpoint; k2jax reads only "
            "safetensors, because unpickling executes arbitrary code from the file. Convert it "
            "to safetensors with a tool you trust first (transformers' save_pretrained writes "
            "safetensors)")
    raise ConversionError(f"{directory}: no {INDEX_FILE} or {SINGLE_FILE}")


class HFCheckpoint:
    """A hub model directory with validated headers: `config` (dict), `tensors` (name ->
    `TensorInfo`) and `read(name) -> np.ndarray`.

    A K2.5-style wrapper (`KimiK25ForConditionalGeneration`) is read as its language model:
    `config` is its `text_config`, `tensors` are named without the `language_model.` prefix
    (`TensorInfo.name` keeps the stored name), and the vision tower's and projector's tensors
    are in `left_out`. `source_config` is config.json as stored.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(self.directory):
            raise ConversionError(f"{self.directory}: no such directory")
        listing = os.listdir(self.directory)
        self.source_config = self._read_json("config.json")
        self.config, self.prefix = self.source_config, ""
        if is_wrapper_config(self.source_config):
            try:
                self.config = text_model_config(self.source_config)
            except ConfigError as e:
                raise ConversionError(f"config.json: {e}") from None
            self.prefix = LANGUAGE_MODEL_PREFIX
        # The file that says where tensors are: missing ones are reported against it.
        self.index_name = INDEX_FILE if INDEX_FILE in listing else SINGLE_FILE
        if INDEX_FILE in listing:
            weight_map = self._read_json(INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{INDEX_FILE}: no weight_map")
        elif SINGLE_FILE in listing:
            weight_map = None
        else:
            refuse_pickle(self.directory, listing)
        self.tensors = self._read_headers(weight_map)
        self.left_out: dict[str, TensorInfo] = {}
        if self.prefix:
            self.tensors, self.left_out = self._language_model_tensors(self.tensors)
        self._files: dict[str, int] = {}
        self._lock = threading.Lock()

    def _read_json(self, name: str) -> dict:
        path = os.path.join(self.directory, name)
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConversionError(f"{self.directory}: no {name}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ConversionError(f"{name}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConversionError(f"{name}: not a JSON object")
        return data

    def _read_headers(self, weight_map: dict[str, str] | None) -> dict[str, TensorInfo]:
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        not_safetensors = [f for f in files if not f.endswith(".safetensors")]
        if not_safetensors:
            refuse_pickle(INDEX_FILE, not_safetensors)
        tensors, problems, owner = {}, [], {}
        for file in files:
            path = os.path.join(self.directory, file)
            if not os.path.isfile(path):
                names = sorted(n for n, f in weight_map.items() if f == file)
                problems.append(f"{INDEX_FILE}: shard {file} (holding {names[0]}"
                                f"{f' and {len(names) - 1} more' if len(names) > 1 else ''}) "
                                "does not exist")
                continue
            found, bad = read_header(path)
            problems += bad
            for name, info in found.items():
                if name in owner:
                    problems.append(f"{file}: {name}: also in {owner[name]}")
                owner[name] = file
                tensors[name] = info
        if weight_map:
            for name, file in sorted(weight_map.items()):
                if owner.get(name, file) != file:
                    problems.append(f"{INDEX_FILE}: {name} is indexed in {file} but lies in "
                                    f"{owner[name]}")
                elif name not in owner and os.path.isfile(os.path.join(self.directory, file)):
                    problems.append(f"{INDEX_FILE}: {name} is indexed in {file}, which has "
                                    "no such tensor")
            for name in sorted(owner.keys() - weight_map.keys()):
                problems.append(f"{owner[name]}: {name} is missing from {INDEX_FILE}")
        if problems:
            raise ConversionError(problems)
        return tensors

    def _language_model_tensors(self, tensors: dict[str, TensorInfo]):
        """`(language model tensors without the prefix, left-out multimodal tensors)`; any
        other tensor keeps its name, to be reported as unexpected."""
        kept, left_out, problems = {}, {}, []
        for name, info in tensors.items():
            if name.startswith(MULTIMODAL_PREFIXES):
                left_out[name] = info
                continue
            key = name.removeprefix(self.prefix)
            if key in kept:
                problems.append(f"{info.file}: {name}: the language model's {key} is stored "
                                f"twice (also as {kept[key].name})")
            kept[key] = info
        if problems:
            raise ConversionError(problems)
        return kept, left_out

    def stored_name(self, name: str) -> str:
        """The name a tensor of the language model has (or would have) in the files."""
        info = self.tensors.get(name)
        return info.name if info is not None else self.prefix + name

    def left_out_summary(self) -> dict[str, list[int]]:
        """`{top-level module: [tensors, bytes]}` of the tensors left out."""
        summary: dict[str, list[int]] = {}
        for name, info in sorted(self.left_out.items()):
            entry = summary.setdefault(name.split(".", 1)[0], [0, 0])
            entry[0] += 1
            entry[1] += info.nbytes
        return summary

    def fingerprint(self) -> dict:
        """Identifies the source for resuming: config and each shard's size and mtime."""
        files = sorted({t.file for t in (*self.tensors.values(), *self.left_out.values())})
        stats = {f: os.stat(os.path.join(self.directory, f)) for f in files}
        return {"directory": self.directory, "config": self.source_config,
                "files": {f: [s.st_size, s.st_mtime_ns] for f, s in stats.items()}}

    def read(self, name: str) -> np.ndarray:
        """The tensor's bytes as a numpy array (bf16/fp8 as ml_dtypes). Thread-safe."""
        info = self.tensors[name]
        with self._lock:
            fd = self._files.get(info.file)
            if fd is None:
                fd = self._files[info.file] = os.open(
                    os.path.join(self.directory, info.file), os.O_RDONLY)
        buf = np.empty(info.nbytes, np.uint8)
        view, done = memoryview(buf), 0
        while done < info.nbytes:
            got = os.preadv(fd, [view[done:]], info.begin + done)
            if got == 0:
                raise ConversionError(f"{info.file}: {name}: file ended at byte "
                                      f"{info.begin + done} while reading (truncated since "
                                      "validation?)")
            done += got
        return buf.view(DTYPES[info.dtype]).reshape(info.shape)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
