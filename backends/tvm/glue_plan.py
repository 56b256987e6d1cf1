"""How the lowering moves less data between layers than the program's ops literally say.

Each rule gives the same integers as the op it replaces (the trace still computes the op itself,
so ``verify`` checks both):

- :func:`affine_levels`: codes whose levels are ``a u + b`` reach their consumer as codes, with
  ``(a, b)`` folded into it (:class:`~.kernels.glue.Terms`), instead of through a lookup;
- :func:`folds_add`: a residual add read only by requantizations (or adds, or the dequantize) is
  computed inside each reader from the add's inputs, when that reads no more than writing the
  sum and reading it back;
- :func:`pooled_first`: the staircase is non-decreasing in ``direction * V``, so
  ``maxpool(requantize(V)) = requantize'(maxpool(direction * V))`` with ``requantize'`` the same
  staircase with every direction positive: the requantization runs on the pooled, smaller
  tensor, and one pool serves every requantization of ``V`` with the same directions;
- :func:`staircase_table`: a requantization of a small input range without a fixed-point form is
  a table of its codes over the whole range, filled by the reference staircase;
- :func:`passes_packed`: codes that go from one bit-serial conv to others only travel as the
  packed bit planes the readers would otherwise pack themselves;
- :func:`writes_amx_layout`, :func:`reads_amx_layout`: codes that only AMX convs read only
  travel in the readers' shared layout (:func:`amx_layout`), written by the epilogue of the conv
  or the requantization kernel that computes them.
"""

import numpy as np
import torch

from qcompile import integer_ir as ir
from qcompile.backends.tvm.kernels import amx, bitserial_packed, direct, glue
from qcompile.requantization import apply_staircase

BITSERIAL_BITS = 4
"""Layers with codes and weights of at most this many bits run bit-serial..."""
BITSERIAL_PLANE_PAIRS = 4
"""...unless the target has VNNI and the layer has more plane pairs (code bits times weight
bits) than this: W3A3, W4A2, W4A4 run on VNNI bytes (:func:`on_vnni_bytes`). A bit-serial
layer's work grows with the plane pairs, a byte dot product's does not (RESULTS.md, "Conv
kernels": 64->64 56x56 W2A2 0.27 ms, W4A4 1.11, onnxruntime int8 0.37)."""
TABLE_WIDTH = 4096
"""A requantization whose input spans at most this many integers per row..."""
TABLE_ENTRIES = 2**16
"""...and at most this many in all is a table lookup (a byte per entry for 8-bit codes)."""


def affine_levels(levels: torch.Tensor) -> tuple[int, int] | None:
    """``(a, b)`` with ``levels[u] = a u + b`` for every code ``u``, or None."""
    first = int(levels[0])
    step = int(levels[1]) - first if len(levels) > 1 else 1
    codes = torch.arange(len(levels), dtype=levels.dtype)
    return (step, first) if bool(torch.equal(levels, step * codes + first)) else None


def folds_add(op: ir.Add, sources: int, readers: list, graph: ir.IntegerGraph,
              pooled: dict) -> bool:
    """Whether the readers of ``op`` (a sum of ``sources`` tensors) compute it themselves."""
    if op.name == graph.output or not readers:
        return False
    if not all(isinstance(r, (ir.Requantize, ir.Add, ir.Dequantize)) and r.name not in pooled
               for r in readers):
        return False
    return len(readers) * sources <= sources + 1 + len(readers)


def pooled_first(graph: ir.IntegerGraph, readers: dict, fused: dict) -> dict[str, ir.MaxPool]:
    """Requantizations (by name) to run after the max pool that reads them: those of a layer's
    accumulator (not fused into the layer) read by that pool only."""
    producers = {op.name: op for op in graph.ops}
    moved = {}
    for op in graph.ops:
        producer = producers.get(getattr(op, "input", None))
        if (isinstance(op, ir.MaxPool) and isinstance(producer, ir.Requantize)
                and producer.name not in fused and len(readers[op.input]) == 1
                and isinstance(producers.get(producer.input), (ir.Conv, ir.Linear))):
            moved[producer.name] = op
    return moved


def staircase_table(op: ir.Requantize, fmt) -> tuple[int, np.ndarray] | None:
    """``(low, table)`` with ``table[row, V - low]`` the code of every ``V`` the input (of
    format ``fmt``) can take, when that range is small and the op has no fixed-point form (a
    multiply and shift costs no more than a gather); else None."""
    if op.fixed_point is not None:
        return None
    if isinstance(fmt, ir.Accumulator):
        low, high = -fmt.bound, fmt.bound
    elif isinstance(fmt, ir.CodeFormat):
        low, high = int(fmt.levels.min()), int(fmt.levels.max())
    else:
        return None
    rows, width = op.thresholds.shape[0], high - low + 1
    if width > TABLE_WIDTH or rows * width > TABLE_ENTRIES:
        return None
    values = torch.arange(low, high + 1, dtype=torch.int64).expand(1, rows, width)
    codes = apply_staircase(values, op.thresholds.long(), op.direction.long())
    return low, glue.narrow(codes[0].numpy())


def on_amx(op, graph: ir.IntegerGraph, target) -> bool:
    """Whether layer ``op`` runs on AMX (:mod:`.kernels.amx`): a conv without groups or
    dilation, of one stride both ways, on a target with AMX-INT8, whose input codes stand for
    themselves and fit a byte and whose weight levels fit int8."""
    if not (isinstance(op, ir.Conv) and amx.available(target)):
        return False
    fmt = graph.values[op.input]
    if not (isinstance(fmt, ir.CodeFormat) and affine_levels(fmt.levels) == (1, 0)
            and len(fmt.levels) <= 256):
        return False
    levels = op.weight.levels
    return bool(op.groups == 1 and tuple(op.dilation) == (1, 1) and op.stride[0] == op.stride[1]
                and len(op.weight.shape) == 4
                and int(levels.min()) >= -128 and int(levels.max()) <= 127)


def bit_serial(op, graph: ir.IntegerGraph, target=None) -> bool:
    """Whether layer ``op`` runs bit-serial: low-bit codes standing for themselves times
    low-bit weights of an affine form, and no groups, unless it runs on AMX on ``target``, or
    on VNNI bytes there with more than :data:`BITSERIAL_PLANE_PAIRS` plane pairs."""
    fmt, weight = graph.values[op.input], op.weight
    return bool(affine_levels(fmt.levels) == (1, 0) and fmt.bits <= BITSERIAL_BITS
                and weight.bits <= BITSERIAL_BITS and weight.affine is not None
                and (not isinstance(op, ir.Conv) or op.groups == 1)
                and (target is None or not (on_amx(op, graph, target)
                                            or on_vnni_bytes(op, graph, target))))


def on_vnni_bytes(op, graph: ir.IntegerGraph, target) -> bool:
    """Whether layer ``op``, of more than :data:`BITSERIAL_PLANE_PAIRS` plane pairs, would run
    on the direct kernel's VNNI byte dot products on ``target`` (its own rule:
    :func:`.kernels.direct.byte_dot_products`)."""
    fmt, weight = graph.values[op.input], op.weight
    if fmt.bits * weight.bits <= BITSERIAL_PLANE_PAIRS:
        return False
    span = (int(fmt.levels.min()), int(fmt.levels.max()))
    return direct.byte_dot_products(target, direct.weight_dtype(weight.levels.numpy()), span,
                                    int(weight.shape[1]))


def amx_layout(value: str, readers: dict, graph: ir.IntegerGraph, shapes: dict, target
               ) -> "amx.Layout | None":
    """The :class:`~.kernels.amx.Layout` the AMX convs reading ``value`` share (padded for the
    widest of them, rows for the longest reach), or None where none reads it."""
    convs = [_conv_args(r) for r in readers.get(value, []) if on_amx(r, graph, target)]
    return amx.shared_layout(*shapes[value], convs) if convs else None


def amx_geometry(op: ir.Conv, layout: "amx.Layout") -> "amx.Conv":
    """AMX conv ``op`` over ``layout``."""
    return amx.Conv(layout, *_conv_args(op))


def _conv_args(op: ir.Conv) -> tuple:
    """``op`` as :class:`~.kernels.amx.Conv` takes it: out channels, kernel, stride, padding."""
    return (int(op.weight.shape[0]), tuple(int(k) for k in op.weight.shape[2:]),
            int(op.stride[0]), tuple(int(p) for p in op.padding))


def writes_amx_layout(value: str, layer, readers: dict, graph: ir.IntegerGraph, target) -> bool:
    """Whether AMX conv ``layer`` stores the codes ``value`` (its fused requantization) only
    in the layout of its readers (:func:`reads_amx_layout`)."""
    return on_amx(layer, graph, target) and reads_amx_layout(value, readers, graph, target)


def reads_amx_layout(value: str, readers: dict, graph: ir.IntegerGraph, target) -> bool:
    """Whether the codes ``value`` can be stored in an AMX layout only: every reader is an AMX
    conv, and the codes fit a byte."""
    after = readers.get(value, [])
    return (bool(after) and value != graph.output and len(graph.values[value].levels) <= 256
            and all(on_amx(r, graph, target) for r in after))


def passes_packed(value: str, layer, readers: dict, graph: ir.IntegerGraph, shapes: dict,
                  target) -> bool:
    """Whether the codes ``value`` (requantized inside bit-serial conv ``layer``) go from it to
    their readers as packed planes (:func:`reads_packed`)."""
    return (isinstance(layer, ir.Conv) and bit_serial(layer, graph, target)
            and reads_packed(value, readers, graph, shapes, target))


def reads_packed(value: str, readers: dict, graph: ir.IntegerGraph, shapes: dict,
                 target) -> bool:
    """Whether the codes ``value`` can be stored as packed planes only: every reader is a
    bit-serial conv, and the channels fill whole packed words (or one)."""
    after = readers.get(value, [])
    channels, word = shapes[value][1], bitserial_packed.word_bits(target)
    return (bool(after) and value != graph.output
            and all(isinstance(r, ir.Conv) and bit_serial(r, graph, target) for r in after)
            and (channels <= word or channels % word == 0))


def integers_only(value: str, readers: dict, graph: ir.IntegerGraph, target=None
                  ) -> int | None:
    """The offset ``b`` of codes ``value`` whose levels are ``u + b`` (``b != 0``) when every
    reader is a direct layer, which reads their integers, not the codes: the quantizer can then
    store the integers ``u + b`` in place of the codes (no add kernel between). Else None."""
    fmt, after = graph.values.get(value), readers.get(value, [])
    affine = affine_levels(fmt.levels) if isinstance(fmt, ir.CodeFormat) else None
    if affine is None or affine[0] != 1 or affine[1] == 0 or not after or value == graph.output:
        return None
    direct = all(isinstance(r, (ir.Conv, ir.Linear)) and not bit_serial(r, graph, target)
                 for r in after)
    return affine[1] if direct else None
