"""Collective bytes per step from a compiled module's HLO text."""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce",
               "collective-permute")
_DTYPE_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "f8e4m3fn": 8, "f8e5m2": 8,
               "bf16": 16, "f16": 16, "s16": 16, "u16": 16, "f32": 32, "s32": 32, "u32": 32,
               "f64": 64, "s64": 64, "u64": 64, "c64": 64, "c128": 128}
_SHAPE = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_CALLEES = re.compile(r"\b(?:body|condition|calls|to_apply|branch_computations)="
                      r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _shape_bytes(text: str) -> float:
    """Bytes of an HLO shape string (a tuple's elements summed; layouts ignored)."""
    return sum(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BITS.get(dt, 32) / 8
               for dt, dims in _SHAPE.findall(text) if dt in _DTYPE_BITS)


def collective_bytes(hlo: str) -> dict[str, int]:
    """Per-device operand bytes of each collective kind for one execution of the module.

    A collective inside a loop body counts once per iteration (XLA's known trip count), so the
    layer scan's all-to-alls count once per layer.
    """
    shapes, calls, entry, ops, computation = {}, {}, None, [], None
    for line in hlo.splitlines():
        if not line.startswith((" ", "\t")):
            match = _COMPUTATION.match(line)
            if match:
                computation = match.group(1)
                calls.setdefault(computation, [])
                if line.startswith("ENTRY"):
                    entry = computation
            continue
        match = _INSTRUCTION.match(line)
        if not match or computation is None:
            continue
        name, shape, opcode, rest = match.groups()
        shapes[name] = shape
        trips = _TRIP_COUNT.search(rest)
        for group in _CALLEES.findall(rest):
            for callee in re.findall(r"%?([\w.\-]+)", group):
                calls[computation].append((callee, int(trips.group(1)) if trips and
                                           opcode == "while" else 1))
        kind = opcode.removesuffix("-start")
        if kind in COLLECTIVES:
            operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
            ops.append((computation, kind, operands))

    times: dict[str, int] = {}

    def visit(computation, count):
        times[computation] = times.get(computation, 0) + count
        for callee, factor in calls.get(computation, []):
            visit(callee, count * factor)

    if entry is not None:
        visit(entry, 1)
    totals = {kind: 0 for kind in COLLECTIVES}
    for computation, kind, operands in ops:
        size = sum(_shape_bytes(shapes.get(o, "")) for o in operands)
        totals[kind] += int(size * times.get(computation, 0))
    return {k: v for k, v in totals.items() if v or k != "ragged-all-to-all"}
