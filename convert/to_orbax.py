"""Hub safetensors -> k2jax checkpoint, streaming and resumable.

    convert_to_orbax(HF_DIR, OUT) -> ModelConfig

1. Validate everything before writing anything: config.json, the index, every shard header,
   and every tensor the config implies (missing, unexpected, wrong shape or dtype).
2. Work in `OUT.partial/`: create the leaf arrays (`convert.store`), then convert unit by unit
   (`top` = embedding, final norm, lm_head; then each layer). A unit's hub tensors are read
   and transformed (`convert.hf_layout`) a few at a time on a thread pool and written as
   slices; routed experts go one expert at a time, so memory stays near a few tensors plus
   the bounded write queue, never a layer or the model. When a unit's writes have landed,
   `.convert/done/<unit>` is written.
3. Finalize: check every chunk file exists, write Orbax's metadata, copy the source's
   tokenizer, chat template, generation config and custom code (`convert.bundled_files`),
   write `conversion.json` and finally `config.json` (the source's `auto_map` kept, for the
   export), then rename `OUT.partial` to `OUT`.

A K2.5-style wrapper checkpoint (`KimiK25ForConditionalGeneration`) converts as its language
model: `text_config` and the tensors under `language_model.`; the vision tower and projector are
left out, named in the log and in `conversion.json` (`left_out`: tensors and bytes per module).

A run killed at any point and started again with the same arguments redoes only units without
a done marker (rewriting their whole chunk files), so it ends byte-identical to an
uninterrupted run. Nothing loads before the end: `OUT` does not exist, and `k2jax.load`
refuses a directory without `config.json`, which is written last.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import shutil
import sys

from tqdm import tqdm

from convert import bundled_files, hf_layout, store
from convert.pipeline import ordered_map, thread_pool
from convert.reader import ConversionError, HFCheckpoint
from k2jax import quant
from k2jax.checkpoint import (CONFIG_FILE, PARAMS_DIR, config_to_json, read_config,
                              write_json_atomic)
from k2jax.config import ModelConfig

STATE_DIR = ".convert"
PROVENANCE_FILE = "conversion.json"
# Bytes of converted slices allowed in tensorstore's write queue before the reader waits:
# reading overlaps compression and writing without holding a layer in memory.
WRITE_QUEUE_BYTES = 1 << 30


def target_config(source: ModelConfig, dtype: str | None) -> ModelConfig:
    """The stored config: the source's, or every weight as float `dtype` (INT4 dequantized)."""
    if dtype is None:
        return source
    return source.replace(dtype=dtype, quantized_linears=())


def fp8_blocks(hf_config: dict) -> hf_layout.Fp8Blocks | None:
    qc = hf_config.get("quantization_config") or {}
    if qc.get("quant_method") != "fp8":
        return None
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ConversionError(f"config.json: fp8 fmt {qc['fmt']!r} is not supported (e4m3)")
    block = qc.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(
            isinstance(b, int) and b > 0 for b in block)):
        raise ConversionError(f"config.json: fp8 weight_block_size {block!r} is not two "
                              "positive ints")
    return hf_layout.Fp8Blocks(tuple(block))


def validate(hf: HFCheckpoint, units, source: ModelConfig, fp8) -> dict[str, list[str]]:
    """Checks the hub tensors against the plan. Returns `{item hf name: tensor names}` to read
    and raises `ConversionError` listing every problem with its file and tensor."""
    problems, reads, expected = [], {}, set()
    nextn = int(hf.config.get("num_nextn_predict_layers") or 0)
    for unit in units:
        for item in unit.items:
            stored_fp8 = fp8 if fp8 and f"{item.hf}.weight_scale_inv" in hf.tensors else None
            want = hf_layout.hub_tensors(item, stored_fp8)
            reads[item.hf] = list(want)
            expected.update(want)
            for name, (shape, dtypes) in want.items():
                info = hf.tensors.get(name)
                if info is None:
                    problems.append(f"{hf.index_name}: missing tensor {hf.stored_name(name)} ("
                                    f"{'/'.join(dtypes)}{list(shape)}, for "
                                    f"{'/'.join(item.leaf)})")
                elif info.shape != shape:
                    problems.append(f"{info.file}: {info.name}: shape {list(info.shape)}, "
                                    f"config.json implies {list(shape)}")
                elif info.dtype not in dtypes:
                    problems.append(f"{info.file}: {info.name}: dtype {info.dtype}, expected "
                                    f"{' or '.join(dtypes)}")
    problems += _int4_shape_problems(hf, units)
    for name in sorted(hf.tensors.keys() - expected):
        if not hf_layout.extra_layer(name, source, nextn):
            problems.append(f"{hf.tensors[name].file}: {hf.stored_name(name)}: unexpected "
                            "tensor (config.json describes no such parameter)")
    if problems:
        raise ConversionError(problems)
    return reads


def _int4_shape_problems(hf: HFCheckpoint, units) -> list[str]:
    """Reads every `weight_shape` (2 values each) and compares it with the config's shape."""
    problems = []
    for item in (i for u in units for i in u.items if hf_layout.is_int4(i)):
        name = f"{item.hf}.weight_shape"
        info = hf.tensors.get(name)
        if info is None or info.shape != (2,) or info.dtype not in ("I32", "I64"):
            continue  # already reported
        din, dout = item.source.values.shape
        got = hf.read(name).tolist()
        if got != [dout, din]:
            problems.append(f"{info.file}: {info.name}: {got}, config.json implies [{dout}, {din}]")
    return problems


def convert_to_orbax(hf_dir, out_dir, *, dtype: str | None = None, progress: bool = True,
                     log=None, worker: tuple[int, int] = (0, 1)) -> ModelConfig:
    """Converts the hub model in `hf_dir` to a k2jax checkpoint at `out_dir`; returns its config.

    Args:
      dtype: None keeps the source (bf16/f32 as stored, INT4 as `QuantizedWeight`); a float
        dtype name stores every weight in it, INT4 and FP8 dequantized.
      progress: show a tqdm bar (bytes/s, ETA) on stderr.
      log: called with one-line notes (skipped tensors, resuming); default stderr.
      worker: `(i, n)`: convert only units i, i + n, i + 2n, ... of the plan, beside n - 1 other
        workers (processes or hosts sharing the output's filesystem) given the same arguments;
        whichever finishes the last unit finalizes, so the checkpoint is byte-identical to a
        one-worker conversion. `out_dir` exists only once every worker's units are done.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    index, workers = worker
    if not (isinstance(workers, int) and workers >= 1 and 0 <= index < workers):
        raise ConversionError(f"worker {index}/{workers}: expected i/n with 0 <= i < n")
    out = os.path.abspath(os.fspath(out_dir))
    partial = out + ".partial"
    with HFCheckpoint(hf_dir) as hf, _OutputLock(out) as lock:
        source = ModelConfig.from_hf(hf.config)
        target = target_config(source, dtype)
        fp8 = fp8_blocks(hf.config)
        units = hf_layout.plan(source, target)
        reads = validate(hf, units, source, fp8)
        provenance = {"source": hf.fingerprint(), "dtype": dtype, "format": 1}
        left_out = hf.left_out_summary()
        if left_out:
            provenance["left_out"] = left_out
        skipped = sorted(hf.tensors.keys() - {n for names in reads.values() for n in names})
        lock.acquire()
        if _already_done(out, partial, provenance):
            # A checkpoint converted before files were bundled gets the missing ones.
            added = bundled_files.copy_bundled(hf.directory, out, replace=False)
            log(f"{out} already holds this conversion"
                + (f"; added {', '.join(added)}" if added else ""))
            return read_config(out)
        if left_out:
            wrapper = ", ".join(hf.source_config.get("architectures") or ["a wrapper"])
            log(f"converting the language model of {wrapper}; leaving out "
                + ", ".join(f"{module} ({count} tensors, {nbytes / 2**20:.1f} MiB)"
                            for module, (count, nbytes) in left_out.items()))
        if skipped:
            log(f"skipping {len(skipped)} tensors of layers past num_hidden_layers="
                f"{source.num_hidden_layers} (multi-token prediction, which k2jax does not run)")
        specs = _array_specs(units)
        params_dir = os.path.join(partial, PARAMS_DIR)
        # Other workers may be writing: their in-flight chunk files stay until the finish.
        state = _prepare(partial, provenance, log, discard_partial_writes=workers == 1)
        created = os.path.join(state, "created")
        arrays = store.open_arrays(params_dir, specs, create=not os.path.exists(created))
        _touch(created)
        lock.release()
        done_dir = os.path.join(state, "done")
        mine = units[index::workers]
        todo = [u for u in mine if not os.path.exists(os.path.join(done_dir, u.name))]
        total = sum(hf.tensors[n].nbytes for u in todo for i in u.items for n in reads[i.hf])
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, smoothing=0.05,
                  disable=not progress, desc="convert", dynamic_ncols=True) as bar, \
                thread_pool() as pool:
            for unit in todo:
                _convert_unit(unit, hf, arrays, reads, fp8, bar, pool)
                os.sync()  # the unit's chunks reach the disk before its marker does
                _touch(os.path.join(done_dir, unit.name))
        stored = config_to_json(target)
        if hf.config.get("auto_map"):
            stored["auto_map"] = hf.config["auto_map"]
        lock.acquire()
        remaining = [u.name for u in units if not os.path.exists(os.path.join(done_dir, u.name))]
        if remaining:
            log(f"worker {index}/{workers}: its {len(mine)} units are done; {len(remaining)} "
                f"remain for the other workers, the last of which finalizes {out}")
        elif os.path.isdir(partial):  # not finalized by another worker already
            _finalize(out, partial, params_dir, specs, stored, provenance, hf.directory)
    return target


class _OutputLock:
    """An exclusive lock (`flock` on `OUT.lock`) that workers converting into the same `OUT`
    take while they prepare or finalize it; released on exit."""

    def __init__(self, out: str):
        self.out, self.path = out, out + ".lock"
        self._file = None

    def __enter__(self) -> "_OutputLock":
        return self

    def acquire(self) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._file = open(self.path, "a")
            fcntl.flock(self._file, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __exit__(self, *exc) -> None:
        finished = self._file is not None and os.path.isfile(
            os.path.join(self.out, CONFIG_FILE))
        if finished:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        self.release()


class _Writer:
    """Writes converted slices, waiting on the oldest writes once `WRITE_QUEUE_BYTES` are queued."""

    def __init__(self, arrays):
        self.arrays, self.writes, self.queued = arrays, collections.deque(), 0

    def write(self, item, value) -> None:
        parts = ({"values": value.values, "scale": value.scale}
                 if isinstance(value, quant.QuantizedWeight) else {None: value})
        for field, array in parts.items():
            name = store.leaf_name(item.leaf + ((field,) if field else ()))
            # The array is never modified again, so tensorstore may keep it instead of copying.
            write = self.arrays[name][item.index].write(
                array, can_reference_source_data_indefinitely=True)
            self.writes.append((write, array.nbytes))
            self.queued += array.nbytes
        while self.queued > WRITE_QUEUE_BYTES:
            self._wait_oldest()

    def finish(self) -> None:
        while self.writes:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, nbytes = self.writes.popleft()
        future.result()
        self.queued -= nbytes


def _convert_unit(unit, hf, arrays, reads, fp8, bar, pool) -> None:
    def load(item):
        stored_fp8 = fp8 if f"{item.hf}.weight_scale_inv" in reads[item.hf] else None
        try:
            return item, hf_layout.from_hub(item, hf.read, stored_fp8)
        except ConversionError:
            raise
        except ValueError as e:
            files = sorted({hf.tensors[n].file for n in reads[item.hf]})
            raise ConversionError(f"{', '.join(files)}: {item.hf}: {e}") from None

    writer = _Writer(arrays)
    for item, value in ordered_map(pool, load, unit.items):
        writer.write(item, value)
        bar.update(sum(hf.tensors[n].nbytes for n in reads[item.hf]))
    writer.finish()


def _array_specs(units) -> dict[str, store.ArraySpec]:
    """The stacked leaf arrays: stacked axes (largest index + 1), then the item's shape."""
    extent, targets = {}, {}
    for unit in units:
        for item in unit.items:
            prev = extent.get(item.leaf, (0,) * len(item.index))
            extent[item.leaf] = tuple(max(n, i + 1) for n, i in zip(prev, item.index))
            targets[item.leaf] = item.target
    specs = {}
    for leaf, stack in sorted(extent.items()):
        tgt = targets[leaf]
        fields = ({"values": tgt.values, "scale": tgt.scale}
                  if isinstance(tgt, quant.QuantizedWeight) else {None: tgt})
        for field, sds in fields.items():
            name = store.leaf_name(leaf + ((field,) if field else ()))
            specs[name] = store.ArraySpec(stack + tuple(sds.shape), sds.dtype, len(stack))
    return specs


def _already_done(out: str, partial: str, provenance: dict) -> bool:
    """True if `out` is this conversion, complete (finishing an interrupted rename first)."""
    if os.path.isfile(os.path.join(partial, CONFIG_FILE)) and not os.path.exists(out):
        os.rename(partial, out)  # killed between writing config.json and the rename
    if not os.path.exists(out):
        return False
    try:
        with open(os.path.join(out, PROVENANCE_FILE)) as f:
            same = json.load(f) == _jsonable(provenance)
    except (OSError, ValueError):
        same = False
    if not same or not os.path.isfile(os.path.join(out, CONFIG_FILE)):
        raise ConversionError(f"{out} already exists and is not this conversion's result; "
                              "remove it or choose another output directory")
    shutil.rmtree(os.path.join(out, STATE_DIR), ignore_errors=True)
    return True


def _prepare(partial: str, provenance: dict, log, discard_partial_writes: bool = True) -> str:
    """Creates `partial` or checks that it was started with the same source and options.

    Returns the state directory: `plan.json`, `created` (the arrays exist), `done/<unit>`."""
    state = os.path.join(partial, STATE_DIR)
    plan_file = os.path.join(state, "plan.json")
    if os.path.exists(partial):
        try:
            with open(plan_file) as f:
                started = json.load(f)
        except (OSError, ValueError):
            raise ConversionError(f"{partial} exists but is not a k2jax conversion in "
                                  "progress; remove it") from None
        if started != _jsonable(provenance):
            raise ConversionError(f"{partial} holds a conversion started from a different "
                                  "source or with other options; remove it to start over")
        done = len(os.listdir(os.path.join(state, "done")))
        removed = (store.remove_partial_writes(os.path.join(partial, PARAMS_DIR))
                   if discard_partial_writes else 0)
        log(f"resuming {partial}: {done} units done"
            + (f", {removed} interrupted chunk writes discarded" if removed else ""))
    else:
        # Assembled aside and renamed, so `partial` never exists without its plan.
        fresh = partial + ".new"
        shutil.rmtree(fresh, ignore_errors=True)
        os.makedirs(os.path.join(fresh, STATE_DIR, "done"))
        write_json_atomic(os.path.join(fresh, STATE_DIR, "plan.json"), provenance)
        os.rename(fresh, partial)
    return state


def _finalize(out, partial, params_dir, specs, stored_config: dict, provenance,
              source_dir: str) -> None:
    store.remove_partial_writes(params_dir)  # what killed workers left; no worker writes now
    missing = store.missing_chunks(params_dir, specs)
    if missing:
        raise ConversionError(f"{partial}: incomplete arrays despite done markers: "
                              f"{', '.join(missing[:5])}; remove it and convert again")
    store.write_metadata(params_dir, specs)
    bundled_files.copy_bundled(source_dir, partial)
    write_json_atomic(os.path.join(partial, PROVENANCE_FILE), provenance)
    write_json_atomic(os.path.join(partial, CONFIG_FILE), stored_config)
    os.rename(partial, out)
    shutil.rmtree(os.path.join(out, STATE_DIR))


def _jsonable(data):
    return json.loads(json.dumps(data))


def _touch(path: str) -> None:
    with open(path, "w") as f:
        f.flush()
        os.fsync(f.fileno())
