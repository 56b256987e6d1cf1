"""Pooling kernels: max and sum over windows of int32 values, as scheduled TIR.

Fixed windows (kernel, stride, padding, ceil mode) take :func:`fixed_pool`: the input plane is
first copied into a padded plane (``INT32_MIN`` for max, 0 for sum), so every window is made of
unconditional reads, unrolled. Max and sum are separable: a ``partial`` plane reduces the window's
rows first, along contiguous rows of the padded plane, and the output then reduces ``kw``
strided reads of it (a 3x3 stride-2 max pool of 64x112x112: 0.29 ms against 0.52 ms for the nine
strided reads per output, one thread, znver4). The planes are computed per (batch, channel)
inside the parallel loop, so they stay in cache. The row loops are left to LLVM's loop
vectorizer: TVM's vectorization loads a strided row one lane at a time and leaves rows of odd
width (the padded 113) scalar, where LLVM loads whole vectors and deinterleaves them with
shuffles, with a scalar remainder (the same pool: 137 -> 81 us on two threads). Adaptive
windows, whose bounds vary per position, take :func:`window_pool`: one guarded read per tap, in
the elementwise schedule.
"""

import itertools
from dataclasses import dataclass

import tvm
from tvm import te, tirx

from qcompile.backends.tvm.kernels.glue import INT32_MIN, Terms, schedule_elementwise


@dataclass(frozen=True)
class Windows:
    """Pooling windows along one spatial dimension, in closed form: output position ``o`` covers
    the input positions ``[start(o), stop(o))`` with ``start(o) = floor((a o + b) / c)`` for
    ``start = (a, b, c)``, and ``stop`` likewise. Fixed pooling is ``(s, -p, 1)`` and
    ``(s, k - p, 1)``; adaptive pooling of ``L`` positions to ``n`` is ``(L, 0, n)`` and
    ``(L, L + n - 1, n)``. Bounds may reach into the padding. A closed form (not a table of
    bounds per position) keeps the kernel one short expression per tap."""

    count: int
    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    def bounds(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of every output position."""
        return [(_affine_floor(self.start, o), _affine_floor(self.stop, o))
                for o in range(self.count)]

    @property
    def span(self) -> int:
        """The widest window."""
        return max(stop - start for start, stop in self.bounds())

    def expression(self, o, end: int):
        """TIR ``start(o)`` (``end=0``) or ``stop(o)`` (``end=1``)."""
        a, b, c = self.stop if end else self.start
        value = o * a + b
        return value if c == 1 else tirx.floordiv(value, c)


def _affine_floor(coefficients: tuple[int, int, int], o: int) -> int:
    a, b, c = coefficients
    return (a * o + b) // c


def fixed_windows(length: int, kernel: int, stride: int, padding: int, dilation: int,
                  ceil_mode: bool) -> Windows:
    """Windows of a fixed-size pool along one dimension (dilation 1 only for now)."""
    if dilation != 1:
        raise NotImplementedError("dilated pooling")
    span = length + 2 * padding - kernel
    count = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (count - 1) * stride >= length + padding:
        count -= 1
    return Windows(count, (stride, -padding, 1), (stride, kernel - padding, 1))


def adaptive_windows(length: int, size: int) -> Windows:
    return Windows(size, (length, 0, size), (length, length + size - 1, size))


def _empty(mode: str):
    return tirx.const(0 if mode == "sum" else INT32_MIN, "int32")


def _combine(mode: str, a, b):
    return a + b if mode == "sum" else tvm.te.max(a, b)


def fixed_pool(shape, kernel, stride, padding, counts, mode: str, target, symbol: str,
               terms: Terms = Terms((1,)), signed: bool = False) -> tirx.PrimFunc:
    """Max (``mode="max"``) or sum of ``terms`` applied to an int32 tensor over fixed windows
    (``kernel``, ``stride``, ``padding`` per spatial dimension; ``counts`` output positions, as
    :func:`fixed_windows` counts them); positions outside the input are skipped (max) or count
    as 0 (sum). ``signed``: the input is first multiplied by a per-channel sign (an int32 (C,)
    input after ``x``), so a max pool takes the minimum where the sign is -1."""
    x = te.placeholder(shape, "int32", name="x")
    signs = [te.placeholder((shape[1],), "int32", name="sign")] if signed else []
    dims = len(kernel)
    sizes = [max(n + p, (o - 1) * s + k)
             for n, k, s, p, o in zip(shape[2:], kernel, stride, padding, counts, strict=True)]

    def pad(n, c, *i):
        inside = tirx.all(*[tirx.all(i[d] >= padding[d], i[d] < shape[2 + d] + padding[d])
                            for d in range(dims)])
        read = x[(n, c, *[i[d] - padding[d] for d in range(dims)])]
        if signed:
            read = read * signs[0][c]
        return tirx.if_then_else(inside, terms.apply([read]), _empty(mode))

    padded = te.compute((*shape[:2], *sizes), pad, name="padded")

    def rows(n, c, *o):
        """The window's leading dimensions reduced; the last one still padded input."""
        result = None
        for taps in itertools.product(*[range(k) for k in kernel[:-1]]):
            read = padded[(n, c, *[o[d] * stride[d] + taps[d] for d in range(dims - 1)], o[-1])]
            result = read if result is None else _combine(mode, result, read)
        return result

    partial = te.compute((*shape[:2], *counts[:-1], sizes[-1]), rows, name="partial")

    def pooled(n, c, *o):
        result = None
        for tap in range(kernel[-1]):
            read = partial[(n, c, *o[:-1], o[-1] * stride[-1] + tap)]
            result = read if result is None else _combine(mode, result, read)
        return result

    out = te.compute((*shape[:2], *counts), pooled, name="pooled")
    func = te.create_prim_func([x, *signs, out]).with_attr("global_symbol", symbol)
    if target.kind.name == "cuda":
        return schedule_elementwise(func, target, symbol)
    sch = tvm.s_tir.Schedule(func)
    blocks = [sch.get_sblock(name) for name in ("padded", "partial", "pooled")]
    loops = sch.get_loops(blocks[-1])
    planes = sch.fuse(loops[0], loops[1])
    sch.parallel(planes)
    for block in reversed(blocks[:-1]):
        sch.compute_at(block, planes)
    return sch.mod["main"]


def window_pool(shape, windows: list[Windows], mode: str, target, symbol: str,
                terms: Terms = Terms((1,))) -> tirx.PrimFunc:
    """Sum (``mode="sum"``) or max of ``terms`` applied to int32 values over windows, one
    :class:`Windows` per spatial dimension; the window is the product of the per-dimension
    ranges, and positions outside the input count as 0 (sum) or are skipped (max)."""
    x = te.placeholder(shape, "int32", name="x")
    out_shape = (*shape[:2], *[w.count for w in windows])
    spans = [w.span for w in windows]

    def pooled(n, c, *o):
        starts = [w.expression(o[d], 0) for d, w in enumerate(windows)]
        stops = [w.expression(o[d], 1) for d, w in enumerate(windows)]
        result = None
        for offsets in itertools.product(*[range(span) for span in spans]):
            position = [starts[d] + offsets[d] for d in range(len(o))]
            inside = tirx.const(True, "bool")
            for d, p in enumerate(position):
                inside = tirx.all(inside, p < stops[d], p >= 0, p < shape[2 + d])
            safe = [tvm.te.max(tvm.te.min(p, shape[2 + d] - 1), 0) for d, p in enumerate(position)]
            value = tirx.if_then_else(inside, terms.apply([x[(n, c, *safe)]]), _empty(mode))
            result = value if result is None else _combine(mode, result, value)
        return result

    out = te.compute(out_shape, pooled, name="pooled")
    return schedule_elementwise(te.create_prim_func([x, out]), target, symbol)
