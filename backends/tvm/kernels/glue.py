"""The small ops between layers, as scheduled TIR kernels: every op of the integer program that
is not a conv or linear layer.

Each builder returns a PrimFunc whose last parameter is the output; the others are the op's
inputs and then its parameters (lookup tables, thresholds), which the lowering passes as
constants or model parameters. Windows (pooling) are written out as sums and maxima of shifted
reads rather than TE reductions, so every kernel is one elementwise loop nest and one schedule
serves them all: :func:`schedule_elementwise` (all loops fused, then parallel + vectorized on CPU,
or split over blocks and threads on CUDA).
"""

import math

import tvm
from tvm import te, tirx

from qcompile.backends.tvm.kernels.epilogue import Epilogue, apply_epilogue

INT32_MIN = -(2**31)
CUDA_THREADS = 256
VECTOR = 16


def schedule_elementwise(func: tirx.PrimFunc, target: tvm.target.Target, symbol: str
                         ) -> tirx.PrimFunc:
    """Inline every block into the output block and parallelize it over all its elements."""
    func = func.with_attr("global_symbol", symbol)
    sch = tvm.s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for block in blocks[:-1]:
        sch.compute_inline(block)
    loops = sch.get_loops(blocks[-1])
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
    in float64, as :meth:`IntegerSpec.quantize` computes it."""
    x = te.placeholder(shape, "float32", name="x")

    def code(*i):
        value = _clamped(x(*i).astype("float64"), low, high)
        q = tirx.nearbyint(value / tirx.const(scale, "float64")) + tirx.const(zero_point,
                                                                               "float64")
        q = tvm.te.max(tvm.te.min(q, tirx.const(qmax, "float64")), tirx.const(qmin, "float64"))
        return q.astype("int32") - first

    out = te.compute(shape, code, name="codes")
    return _build([x, out], target, symbol)


def quantize_thresholds(shape, count: int, low: float, high: float, target, symbol: str
                        ) -> tirx.PrimFunc:
    """Float input to code indices: the number of thresholds (float64 (count,)) reached."""
    x = te.placeholder(shape, "float32", name="x")
    thresholds = te.placeholder((count,), "float64", name="thresholds")

    def code(*i):
        value = _clamped(x(*i).astype("float64"), low, high)
        total = tirx.const(0, "int32")
        for k in range(count):
            total = total + (value >= thresholds[k]).astype("int32")
        return total

    out = te.compute(shape, code, name="codes")
    return _build([x, thresholds, out], target, symbol)


def _clamped(value, low: float, high: float):
    if math.isfinite(low):
        value = tvm.te.max(value, tirx.const(low, "float64"))
    if math.isfinite(high):
        value = tvm.te.min(value, tirx.const(high, "float64"))
    return value


def requantize(shape, epilogue: Epilogue, channels: int, target, symbol: str) -> tirx.PrimFunc:
    """An int32 integer tensor (channels on axis 1) to codes, by the epilogue's staircase."""
    acc = te.placeholder(shape, "int32", name="acc")
    extra = epilogue.placeholders(channels)
    out = apply_epilogue(acc, epilogue, extra)
    return _build([acc, *extra, out], target, symbol)


def add(shape, count: int, target, symbol: str) -> tirx.PrimFunc:
    """The sum of ``count`` int32 tensors."""
    inputs = [te.placeholder(shape, "int32", name=f"x{k}") for k in range(count)]

    def total(*i):
        value = inputs[0](*i)
        for x in inputs[1:]:
            value = value + x(*i)
        return value

    out = te.compute(shape, total, name="sum")
    return _build([*inputs, out], target, symbol)


def window_pool(shape, windows: list[list[tuple[int, int]]], mode: str, target, symbol: str
                ) -> tirx.PrimFunc:
    """Sum (``mode="sum"``) or max of int32 values over windows, per spatial dimension.

    ``windows[d][o]`` is the ``(start, stop)`` of output position ``o`` along spatial dimension
    ``d`` in input coordinates (may reach into the zero / -inf padding); the window is the
    product of the per-dimension ranges.
    """
    x = te.placeholder(shape, "int32", name="x")
    out_shape = (*shape[:2], *[len(w) for w in windows])
    spans = [max(stop - start for start, stop in w) for w in windows]
    empty = tirx.const(0 if mode == "sum" else INT32_MIN, "int32")

    def bound(d, o, end: int):
        """The window's start (``end=0``) or stop (``end=1``) at output position ``o``."""
        table = windows[d]
        value = tirx.const(table[-1][end], "int32")
        for index in range(len(table) - 2, -1, -1):
            value = tirx.Select(o == index, tirx.const(table[index][end], "int32"), value)
        return value

    def pooled(n, c, *o):
        result = None
        for offsets in _product(spans):
            position = [bound(d, o[d], 0) + offsets[d] for d in range(len(o))]
            inside = tirx.const(True, "bool")
            for d, p in enumerate(position):
                inside = tirx.all(inside, p < bound(d, o[d], 1), p >= 0, p < shape[2 + d])
            safe = [tvm.te.max(tvm.te.min(p, shape[2 + d] - 1), 0) for d, p in enumerate(position)]
            value = tirx.if_then_else(inside, x[(n, c, *safe)], empty)
            if result is None:
                result = value
            elif mode == "sum":
                result = result + value
            else:
                result = tvm.te.max(result, value)
        return result

    out = te.compute(out_shape, pooled, name="pooled")
    return _build([x, out], target, symbol)


def _product(spans: list[int]) -> list[tuple[int, ...]]:
    combos = [()]
    for span in spans:
        combos = [c + (k,) for c in combos for k in range(span)]
    return combos


def fixed_windows(length: int, kernel: int, stride: int, padding: int, dilation: int,
                  ceil_mode: bool) -> list[tuple[int, int]]:
    """Windows of a fixed-size pool along one dimension (dilation 1 only for now)."""
    if dilation != 1:
        raise NotImplementedError("dilated pooling")
    span = length + 2 * padding - kernel
    count = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (count - 1) * stride >= length + padding:
        count -= 1
    return [(o * stride - padding, o * stride - padding + kernel) for o in range(count)]


def adaptive_windows(length: int, size: int) -> list[tuple[int, int]]:
    return [((o * length) // size, -((-(o + 1) * length) // size)) for o in range(size)]


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


def dequantize(shape, channels: int, low: float, high: float, target, symbol: str
               ) -> tirx.PrimFunc:
    """``clamp(acc * scale[c] + bias[c])`` in float64, stored as float32 (channels on axis 1;
    ``scale`` and ``bias`` float64 of ``channels`` entries, or one)."""
    acc = te.placeholder(shape, "int32", name="acc")
    scale = te.placeholder((channels,), "float64", name="scale")
    bias = te.placeholder((channels,), "float64", name="bias")

    def value(*i):
        c = i[1] if channels > 1 else 0
        y = acc(*i).astype("float64") * scale[c] + bias[c]
        return _clamped(y, low, high).astype("float32")

    out = te.compute(shape, value, name="logits")
    return _build([acc, scale, bias, out], target, symbol)
