"""The small ops between layers, as scheduled TIR kernels: every op of the integer program that
is not a conv, linear or pooling layer (pooling: :mod:`.pooling`).

Each builder returns a PrimFunc whose last parameter is the output; the others are the op's
inputs and then its parameters (lookup tables, thresholds), which the lowering passes as model
parameters. Every kernel is one elementwise loop nest, and one schedule serves them all:
:func:`schedule_elementwise` (all loops fused, then parallel + vectorized on CPU, or split over
blocks and threads on CUDA).

Integers enter a kernel as :class:`Terms` of its int32 inputs, ``sum_k a_k x_k + b``: codes whose
levels are affine in the code (``levels[u] = a u + b``, e.g. ``u - zero_point``) are read as
codes and their integers formed in registers, so no lookup kernel writes them out first; a
residual add read by a requantization is folded into it the same way.
"""

import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx

from qcompile.backends.tvm.kernels import amx, bitserial_packed
from qcompile.backends.tvm.kernels.epilogue import (
    LINEAR_LEVELS,
    Epilogue,
    apply_epilogue,
    count_reached,
    epilogue_code,
)

INT32_MIN = -(2**31)
CUDA_THREADS = 256
VECTOR = 16


@dataclass(frozen=True)
class Terms:
    """The integers ``sum_k scales[k] * x_k + offset`` of int32 inputs ``x_k`` (int32 by the
    program's static bounds)."""

    scales: tuple[int, ...]
    offset: int = 0

    def apply(self, reads: list):
        total = None
        for scale, read in zip(self.scales, reads, strict=True):
            term = read if scale == 1 else read * tirx.const(scale, "int32")
            total = term if total is None else total + term
        return total + tirx.const(self.offset, "int32") if self.offset else total

    @property
    def tag(self) -> str:
        """A short name for kernel symbols ("" for one input taken as it is)."""
        if self == Terms((1,)):
            return ""
        return ("_s" + "x".join(map(str, self.scales)) + f"o{self.offset}").replace("-", "m")

    def __add__(self, other: "Terms") -> "Terms":
        return Terms(self.scales + other.scales, self.offset + other.offset)


def _integers(shape, terms: Terms) -> tuple[list[te.Tensor], te.Tensor]:
    """Placeholders for the inputs of ``terms`` and the integers they stand for (a stage that
    :func:`schedule_elementwise` inlines)."""
    inputs = [te.placeholder(shape, "int32", name=f"x{k}") for k in range(len(terms.scales))]
    if terms == Terms((1,)):
        return inputs, inputs[0]
    value = te.compute(shape, lambda *i: terms.apply([x(*i) for x in inputs]), name="integers")
    return inputs, value


def schedule_elementwise(func: tirx.PrimFunc, target: tvm.target.Target, symbol: str
                         ) -> tirx.PrimFunc:
    """Inline every block into the output block and parallelize it: over rows, each row (the
    last axis, else the last two) one vector loop when a vector width divides it (no predicated
    tail), so an element's channel and position are loop indices, not divisions of a flat index
    (TVM leaves those divisions in the vector lanes: a flat loop ran about 8 times slower); else
    over all elements, flat."""
    func = func.with_attr("global_symbol", symbol)
    sch = tvm.s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for block in blocks[:-1]:
        sch.compute_inline(block)
    loops = sch.get_loops(blocks[-1])
    extents = [int(sch.get(loop).extent) for loop in loops]
    for tail in (1, 2):
        width = math.prod(extents[-tail:])
        lanes = next((n for n in (VECTOR, VECTOR // 2, VECTOR // 4, width)
                      if width % n == 0 and n <= VECTOR), 0)
        if target.kind.name == "cuda" or len(loops) <= tail or not lanes:
            continue
        rows = sch.fuse(*loops[:-tail]) if len(loops) > tail + 1 else loops[0]
        row = sch.fuse(*loops[-tail:]) if tail > 1 else loops[-1]
        sch.parallel(rows)
        sch.vectorize(sch.split(row, [None, lanes])[1])
        return sch.mod["main"]
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if target.kind.name == "cuda":
        outer, inner = sch.split(fused, [None, CUDA_THREADS])
        sch.bind(outer, "blockIdx.x")
        sch.bind(inner, "threadIdx.x")
    else:
        outer, inner = sch.split(fused, [None, VECTOR])
        sch.parallel(outer)
        sch.vectorize(inner)
    return sch.mod["main"]


def _build(tensors: list[te.Tensor], target, symbol: str) -> tirx.PrimFunc:
    return schedule_elementwise(te.create_prim_func(tensors), target, symbol)


def lookup(shape, table_size: int, target, symbol: str) -> tirx.PrimFunc:
    """``out = table[codes]``: codes (int32) to the integers they stand for."""
    codes = te.placeholder(shape, "int32", name="codes")
    table = te.placeholder((table_size,), "int32", name="table")
    out = te.compute(shape, lambda *i: table[codes(*i)], name="integers")
    return _build([codes, table, out], target, symbol)


def quantize_affine(shape, scale: float, zero_point: float, qmin: int, qmax: int, first: int,
                    low: float, high: float, target, symbol: str) -> tirx.PrimFunc:
    """Float input to code indices: ``clamp(nearbyint(clamp(x) / scale) + zero_point) - first``
    in float32, as :meth:`IntegerSpec.quantize` computes it on a float32 input (its one-element
    scale is a 0-d tensor, so the division runs in the input's type: a float64 division would
    round differently where ``x / scale`` lies within float32 rounding of a half integer).

    The rounding is ``tirx.round``, which TVM lowers to ``llvm.nearbyint`` (and ``nearbyintf``
    on CUDA): ties to even, as torch rounds. ``tirx.nearbyint`` means the same but TVM's
    vectorizer does not widen it: the vector loop became scalar calls that LLVM regathered
    (ResNet-18's input: 119 us against 11 us)."""
    x = te.placeholder(shape, "float32", name="x")

    def code(*i):
        value = _clamped(x(*i), low, high, "float32")
        q = tirx.round(value / tirx.const(scale, "float32")) + tirx.const(zero_point, "float32")
        q = tvm.te.max(tvm.te.min(q, tirx.const(qmax, "float32")), tirx.const(qmin, "float32"))
        return q.astype("int32") - first

    out = te.compute(shape, code, name="codes")
    return _build([x, out], target, symbol)


GUESS_WINDOW = 4
"""Thresholds a :func:`quantize_thresholds` kernel compares around its guess."""


def threshold_line(thresholds: np.ndarray) -> tuple[float, float] | None:
    """``(t_0, spacing)`` when more than :data:`~qcompile.backends.tvm.kernels.epilogue.
    LINEAR_LEVELS` sorted ``thresholds`` each lie within a quarter of ``spacing`` of the line
    ``t_0 + k * spacing`` (a uniform quantizer's, computed in float), else None."""
    count = len(thresholds)
    if count <= LINEAR_LEVELS or not (np.diff(thresholds) >= 0).all():
        return None
    first, spacing = float(thresholds[0]), float(thresholds[-1] - thresholds[0]) / (count - 1)
    line = first + spacing * np.arange(count)
    if not spacing > 0 or np.abs(thresholds - line).max() > spacing / 4:
        return None
    return first, spacing


def quantize_thresholds(shape, count: int, low: float, high: float, target, symbol: str,
                        ordered: bool = False, line: tuple[float, float] | None = None
                        ) -> tirx.PrimFunc:
    """Float input to code indices: the number of thresholds (float64 (count,)) reached.

    With a ``line`` (:func:`threshold_line`) the count is guessed from it, ``floor((x - t_0) /
    spacing) + 1`` (within one of the count of the line's thresholds reached, which is within
    one of the true count, as no threshold is a quarter spacing off the line), and only the
    :data:`GUESS_WINDOW` thresholds from two below the guess are compared: every threshold
    below them is reached and none above. Else ``ordered`` (non-decreasing) thresholds, more
    than :data:`~qcompile.backends.tvm.kernels.epilogue.LINEAR_LEVELS`, are counted in two levels
    (:func:`~qcompile.backends.tvm.kernels.epilogue.count_reached`, about 31 compares for 255),
    and others one by one. A QIL model's 8-bit input, 255 thresholds on a 1x3x224x224 image:
    4.5 ms one by one, 1.6 ms in two levels, 0.16 ms from the line."""
    x = te.placeholder(shape, "float32", name="x")
    thresholds = te.placeholder((count,), "float64", name="thresholds")

    def code(*i):
        value = _clamped(x(*i).astype("float64"), low, high)
        if line is not None:
            first, spacing = (tirx.const(v, "float64") for v in line)
            guess = tvm.te.max(tvm.te.min((value - first) / spacing, tirx.const(
                count + 2, "float64")), tirx.const(-2, "float64"))
            base = tvm.te.max(tvm.te.min(tirx.floor(guess).astype("int32") - 1,
                                         count - GUESS_WINDOW), 0)
            total = base
            for j in range(GUESS_WINDOW):
                total = total + (value >= thresholds[base + j]).astype("int32")
            return total
        if ordered and count > LINEAR_LEVELS:
            return count_reached(value, lambda k: thresholds[k], count)
        total = tirx.const(0, "int32")
        for k in range(count):
            total = total + (value >= thresholds[k]).astype("int32")
        return total

    out = te.compute(shape, code, name="codes")
    return _build([x, thresholds, out], target, symbol)


def _clamped(value, low: float, high: float, dtype: str = "float64"):
    if math.isfinite(low):
        value = tvm.te.max(value, tirx.const(low, dtype))
    if math.isfinite(high):
        value = tvm.te.min(value, tirx.const(high, dtype))
    return value


def _codes_out(tensors: list[te.Tensor], codes: te.Tensor, packed_bits: int, target,
               symbol: str) -> tirx.PrimFunc:
    """The kernel storing ``codes``: as int32, or (``packed_bits`` planes) in the packed layout
    of :mod:`.bitserial_packed` that bit-serial layers read, the codes computed in registers
    and only the words stored."""
    if not packed_bits:
        return _build([*tensors, codes], target, symbol)
    packed = bitserial_packed.pack_stage(codes, packed_bits, bitserial_packed.word_bits(target),
                                         "packed")
    return bitserial_packed.packing_kernel(te.create_prim_func([*tensors, packed]), target,
                                           symbol)


def requantize(shape, epilogue: Epilogue, channels: int, target, symbol: str,
               terms: Terms = Terms((1,)), packed_bits: int = 0, layout=None
               ) -> tirx.PrimFunc:
    """Integers (``terms`` of int32 tensors, channels on axis 1) to codes, by the epilogue's
    staircase; stored packed in ``packed_bits`` planes if given, or in an AMX ``layout``."""
    inputs, acc = _integers(shape, terms)
    extra = epilogue.placeholders(channels)
    if layout is not None:
        count = len(inputs)
        return amx.pack_kernel(shape, layout, symbol, [*inputs, *extra], lambda b, *i: (
            epilogue_code(terms.apply([x[i] for x in b[:count]]), epilogue, b[count:], i[1])))
    out = apply_epilogue(acc, epilogue, extra)
    return _codes_out([*inputs, *extra], out, packed_bits, target, symbol)


def requantize_table(shape, terms: Terms, low: int, table_shape: tuple[int, int],
                     table_dtype: str, target, symbol: str, packed_bits: int = 0, layout=None
                     ) -> tirx.PrimFunc:
    """Integers ``V`` in ``[low, low + width)`` to codes by a table: ``table[row, V - low]``
    (``table_shape = (rows, width)``; rows 1, or one per channel of axis 1), stored narrow
    (:func:`narrow`) and widened here. The lowering fills the table with the reference
    staircase on the whole range, so the kernel is exact by construction; the index is clamped
    into the table (a no-op on the proven range) so no read can leave it. Stored packed in
    ``packed_bits`` planes if given, or in an AMX ``layout``."""
    inputs = [te.placeholder(shape, "int32", name=f"x{k}") for k in range(len(terms.scales))]
    rows, width = table_shape
    table = te.placeholder(table_shape, table_dtype, name="table")

    def code(reads, table, i):
        index = terms.apply(reads) - tirx.const(low, "int32")
        index = tvm.te.max(tvm.te.min(index, width - 1), 0)
        return table[i[1] if rows > 1 else 0, index].astype("int32")

    if layout is not None:
        return amx.pack_kernel(shape, layout, symbol, [*inputs, table], lambda b, *i: code(
            [x[i] for x in b[:-1]], b[-1], i))
    out = te.compute(shape, lambda *i: code([x(*i) for x in inputs], table, i), name="codes")
    return _codes_out([*inputs, table], out, packed_bits, target, symbol)


def narrow(table: np.ndarray) -> np.ndarray:
    """``table`` in the narrowest integer type that holds its entries (tables are parameters:
    their bytes are the artifact's)."""
    for dtype in ("uint8", "int8", "int16", "int32"):
        info = np.iinfo(dtype)
        if table.min() >= info.min and table.max() <= info.max:
            return np.ascontiguousarray(table.astype(dtype))
    raise ValueError(f"table entries past int32: [{table.min()}, {table.max()}]")


def add(shape, terms: Terms, target, symbol: str) -> tirx.PrimFunc:
    """The integers of ``terms``: a sum of int32 tensors, each times its scale, plus the
    offset."""
    inputs, value = _integers(shape, terms)
    if value is inputs[0]:
        value = te.compute(shape, lambda *i: inputs[0](*i), name="copy")
    return _build([*inputs, value], target, symbol)


def reshape(shape_in, shape_out, target, symbol: str) -> tirx.PrimFunc:
    """A row-major reshape (flatten) copy."""
    x = te.placeholder(shape_in, "int32", name="x")
    strides_out = [math.prod(shape_out[d + 1:]) for d in range(len(shape_out))]
    strides_in = [math.prod(shape_in[d + 1:]) for d in range(len(shape_in))]

    def copy(*o):
        flat = sum(o[d] * strides_out[d] for d in range(len(o)))
        index = [(flat // strides_in[d]) % shape_in[d] for d in range(len(shape_in))]
        return x[tuple(index)]

    out = te.compute(tuple(shape_out), copy, name="reshaped")
    return _build([x, out], target, symbol)


def concat(shapes, dim: int, target, symbol: str) -> tirx.PrimFunc:
    inputs = [te.placeholder(s, "int32", name=f"x{k}") for k, s in enumerate(shapes)]
    out_shape = list(shapes[0])
    out_shape[dim] = sum(s[dim] for s in shapes)
    bounds = [sum(s[dim] for s in shapes[:k]) for k in range(len(shapes) + 1)]

    def pick(*o):
        value = None
        for k in range(len(shapes) - 1, -1, -1):
            index = list(o)
            index[dim] = tvm.te.max(tvm.te.min(o[dim] - bounds[k], shapes[k][dim] - 1), 0)
            read = inputs[k][tuple(index)]
            value = read if value is None else tirx.Select(o[dim] < bounds[k + 1], read, value)
        return value

    out = te.compute(tuple(out_shape), pick, name="joined")
    return _build([*inputs, out], target, symbol)


def dequantize(shape, channels: int, low: float, high: float, target, symbol: str,
               terms: Terms = Terms((1,))) -> tirx.PrimFunc:
    """``clamp(V * scale[c] + bias[c])`` in float64, stored as float32, of the integers ``V`` of
    ``terms`` (channels on axis 1; ``scale`` and ``bias`` float64 of ``channels`` entries, or
    one)."""
    inputs, acc = _integers(shape, terms)
    scale = te.placeholder((channels,), "float64", name="scale")
    bias = te.placeholder((channels,), "float64", name="bias")

    def value(*i):
        c = i[1] if channels > 1 else 0
        y = acc(*i).astype("float64") * scale[c] + bias[c]
        return _clamped(y, low, high).astype("float32")

    out = te.compute(shape, value, name="logits")
    return _build([*inputs, scale, bias, out], target, symbol)
