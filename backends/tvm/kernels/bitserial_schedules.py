"""Schedules of the bit-serial kernels of :mod:`.bitserial`, for llvm CPUs and CUDA GPUs.

CPU (AVX-512 with VPOPCNTDQ): a conv's output is tiled into ``kb`` output channels times one
output row, the row's pixels in ``xs`` vectors of 8 (uint64 lanes). The tile's ``kb * xs``
accumulators stay in registers while the reduction runs over kernel taps and words; inside, the
activation plane, pixel vectors, weight plane and channels are unrolled, so every step is a
broadcast weight word ANDed with a vector of 8 activation words, a ``vpopcntq`` and an add.
Vectors past the row's end are computed on zero padding in registers and dropped (nothing reads
them, so LLVM deletes them when the row fits in one tile). The epilogue runs on the tile right
after its reduction (``reverse_compute_at``), vectorized along the row, so codes are stored as
contiguous vectors and the accumulators never go to memory. Tiles are spread over the cores by
(batch, channel block, row). Packing zeroes the padding once and packs the interior, parallel
over rows and vectorized along them; the per-pixel activation sums are vectorized the same way.
Only packing and the tiles run in parallel: the other stages are too small to pay for waking the
thread pool (a few microseconds, and far more on a core shared with another process).

A packed output (stage ``opack``) splits the output channels into words, then ``kb``-channel
tiles: a (batch, word, row) task computes the word's tiles, their codes in a buffer of one row,
then packs every plane of that row, vectorized along it. Packed input that needs padding is
copied into a zero border like the codes are packed, else read in place.

GPU: one thread per output element, which computes its accumulator in a register and applies the
epilogue; packing and activation sums are one thread per element too. A packed output has one
thread per output word, which computes its channels' codes into a local array and packs them.
``popcount`` becomes ``__popc``.
"""

from dataclasses import dataclass

import tvm
from tvm import s_tir

LANES = 8
"""uint64 lanes of an AVX-512 register."""
MAX_ACCUMULATORS = 14
"""Vectors of accumulators in a tile. Also keeps the tile's buffer under the 1 KiB up to which
TVM allocates on the stack: above it the buffer comes from ``TVMBackendAllocWorkspace`` and
LLVM can no longer keep the accumulators in registers (measured 30% slower)."""
GPU_THREADS = 128


@dataclass(frozen=True)
class Plan:
    """Word width and accumulator type of the compute, and the CPU tile: ``kb`` output channels
    times ``xs`` vectors of ``lanes`` pixels. Output rows are padded to a multiple of ``row``."""

    word: int
    accumulator: str
    kb: int = 1
    xs: int = 1
    lanes: int = 1
    classes: int = 1

    @property
    def row(self) -> int:
        return self.xs * self.lanes


GPU_PLAN = Plan(32, "int32")


def _is_gpu(target) -> bool:
    return target.kind.name == "cuda"


def conv_plan(target, channels: int, width: int, w_bits: int, a_bits: int,
              packed_output: bool = False) -> Plan:
    """Tiles of at most about 14 accumulators. Rows of up to 4 vectors keep one accumulator
    per weight ``2^(p+q)`` when there are 2 or 3 of them (measured ~15% faster at W2A2: no
    shift or second add per popcount); wider rows or more classes would spill registers.
    A packed output takes ``kb`` from the divisors of the channels of one output word. At most
    4 channels a tile: a 7-pixel row (one vector) of 8 channels ran W1A1 512->512 at 7x7 in
    0.080-0.083 ms against 0.064-0.067 with 4 (2 threads, packed in and out; 1 and 2 channels
    0.081 and 0.073). Rows of more than 4 vectors (7, from 56 pixels up) are enough
    accumulators alone: one channel a tile ran W1A1 64->64 at 56x56 3-7% faster than two, W2A2
    and W4A4 within 1%."""
    if _is_gpu(target):
        return GPU_PLAN
    vectors = -(-width // LANES)
    xs = vectors if vectors <= 8 else _divisor(vectors, 8, 4) or 8
    classes = w_bits + a_bits - 1 if xs <= 4 and 2 <= w_bits + a_bits - 1 <= 3 else 1
    budget = (12 if classes > 1 else MAX_ACCUMULATORS) // (classes * xs)  # 12: measured
    group = min(channels, 64) if packed_output else channels
    kb = _divisor(group, max(1, min(4 if xs <= 4 else 1, budget, 16 // w_bits)), 1)
    return Plan(64, "int64", kb, xs, LANES, classes)


def dense_plan(target) -> Plan:
    return GPU_PLAN if _is_gpu(target) else Plan(64, "int64")


def _divisor(count: int, high: int, low: int) -> int:
    """The largest divisor of ``count`` in ``[low, high]``, or 0."""
    return next((d for d in range(high, low - 1, -1) if count % d == 0), 0)


def schedule_conv(func: tvm.tirx.PrimFunc, plan: Plan, target) -> tvm.tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    _start_from_activation_sums(sch)
    if _is_gpu(target):
        _gpu(sch)
        return sch.mod["main"]
    dot, acc, out = sch.get_sblock("dot"), sch.get_sblock("acc"), _output(sch)
    n, cls, k, y, x, ri, rj, rw, rp, rq = sch.get_loops(dot)
    xo, xi, xl = sch.split(x, [None, plan.xs, plan.lanes])
    if _has(sch, "opack"):
        kg, ko, ki = sch.split(k, [None, min(plan.word, int(sch.get(k).extent)) // plan.kb,
                                   plan.kb])
        sch.reorder(n, kg, y, ko, xo, ri, rj, rw, rq, xi, rp, ki, cls, xl)
        tile, outer = ko, (n, kg, y)
    else:
        ko, ki = sch.split(k, [None, plan.kb])
        sch.reorder(n, ko, y, xo, ri, rj, rw, rq, xi, rp, ki, cls, xl)
        tile, outer = y, (n, ko, y)
    sch.reverse_compute_at(acc, tile, preserve_unit_loops=True)
    *_, ax, rc = sch.get_loops(acc)
    sch.reorder(rc, ax)
    _vectorize_row(sch, ax)
    if not sch.get(out).same_as(sch.get(acc)):
        sch.reverse_compute_at(out, tile, preserve_unit_loops=True)
        _vectorize_row(sch, sch.get_loops(out)[-1])
    if _has(sch, "opack"):
        _pack_output(sch, y)
    sch.parallel(sch.fuse(*outer))
    for loop in (rq, xi, rp, ki, cls):
        sch.unroll(loop)
    sch.vectorize(xl)
    sch.decompose_reduction(dot, ri)
    sch.decompose_reduction(acc, rc)
    if _has(sch, "asum"):
        _activation_sums(sch, plan)
    _pack(sch)
    return sch.mod["main"]


def schedule_dense(func: tvm.tirx.PrimFunc, plan: Plan, target) -> tvm.tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    _start_from_activation_sums(sch)
    if _is_gpu(target):
        _gpu(sch)
        return sch.mod["main"]
    dot, out = sch.get_sblock("dot"), _output(sch)
    n, k, rw, rp, rq = sch.get_loops(dot)
    ko, ki = sch.split(k, [None, 16])
    sch.reorder(ko, n, ki, rw, rq, rp)
    sch.reverse_compute_at(out, ko)
    sch.parallel(ko)
    sch.unroll(rq)
    sch.unroll(rp)
    sch.decompose_reduction(dot, rw)
    return sch.mod["main"]


def _start_from_activation_sums(sch: s_tir.Schedule) -> None:
    """Make ``dot``'s reduction start from ``asum`` (the ``- beta * sum(a)`` term) instead of 0.

    The compute states it as the reduction's ``init``, which keeps ``asum`` in the PrimFunc and
    before ``dot``, but ``te.create_prim_func`` initializes reductions to the identity; the
    block is rebuilt here with the intended init. Reading ``asum`` in the init rather than in the
    epilogue lets the epilogue move into ``dot``'s tile loop, whose producers must all be under
    it, while ``asum`` is still computed once per pixel."""
    if not _has(sch, "asum"):
        return
    rv = sch.get_sblock("dot")
    block, sums = sch.get(rv), sch.get(sch.get_sblock("asum")).writes[0].source
    store = block.init
    rank = len(sch.get(sch.get_sblock("asum")).iter_vars) - _reduce_count(sch, "asum")
    index = [store.indices[0], *store.indices[len(store.indices) - rank + 1:]]
    value = tvm.tirx.BufferLoad(sums, index)
    if len(store.indices) == 5:
        value = tvm.tirx.Select(store.indices[1] == 0, value, tvm.tirx.const(0, value.ty))
    init = tvm.tirx.BufferStore(store.buffer, value, store.indices)
    region = tvm.tirx.BufferRegion(sums, [tvm.ir.Range.from_min_extent(i, 1) for i in index])
    rebuilt = s_tir.SBlock(block.iter_vars, [*block.reads, region], block.writes,
                           block.name_hint, block.body, init, block.alloc_buffers,
                           block.match_buffers, block.annotations)
    sch.state.replace(sch.get_sref(rv), rebuilt, {block: rebuilt})


def _output(sch: s_tir.Schedule):
    """The output block; an elementwise ``acc`` stage is inlined into it."""
    blocks = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
              if sch.get(b).name_hint != "opack"]
    acc = sch.get_sblock("acc")
    if sch.get(blocks[-1]).name_hint != "acc" and _spatial_count(sch, acc) == len(
            sch.get(acc).iter_vars):
        sch.compute_inline(acc)
    return blocks[-1]


def _has(sch: s_tir.Schedule, name: str) -> bool:
    return any(sch.get(b).name_hint == name
               for b in sch.get_child_blocks(sch.get_sblock("root")))


def _vectorize_row(sch: s_tir.Schedule, loop) -> None:
    """Vectorize a loop along an output row: by 8 when the row divides, else whole (LLVM
    splits an odd-sized vector into legal pieces) when it is short."""
    width = int(sch.get(loop).extent)
    if width % LANES == 0:
        sch.vectorize(sch.split(loop, [None, LANES])[1])
    elif width <= 8 * LANES:
        sch.vectorize(loop)


def _activation_sums(sch: s_tir.Schedule, plan: Plan) -> None:
    block = sch.get_sblock("asum")
    n, y, x, *reduce = sch.get_loops(block)
    xo, xl = sch.split(x, [None, plan.lanes])
    sch.reorder(xo, *reduce, xl)
    sch.vectorize(xl)
    sch.decompose_reduction(block, reduce[0])


def _pack_output(sch: s_tir.Schedule, row) -> None:
    """Pack a row of output codes for the next layer once the tiles of one output word's
    channels have stored them: per vector of pixels, every plane (the codes loaded once)."""
    block = sch.get_sblock("opack")
    sch.reverse_compute_at(block, row, preserve_unit_loops=True)
    *_, q, _, _, x = sch.get_loops(block)
    width = int(sch.get(x).extent)
    lanes = LANES if width % LANES == 0 or width > 8 * LANES else width
    xo, xl = sch.split(x, [None, lanes])
    sch.reorder(xo, q, xl)
    sch.unroll(q)
    sch.vectorize(xl)


def _pack(sch: s_tir.Schedule) -> None:
    """Zero the padded packed activations, then pack (or copy, when the input is packed) the
    interior vectorized along rows; split the columns by stride phase when the stride is above
    1. Packed input that needs no padding has neither stage."""
    blocks = [sch.get_sblock(name) for name in ("apad", "apack") if _has(sch, name)]
    if not blocks:
        return
    block = blocks[0]
    value = sch.get(block).body.value
    if sch.get(block).name_hint == "apad" and isinstance(value, tvm.ir.Call) \
            and value.op.name.endswith("if_then_else"):
        sch.decompose_padding(block, sch.get_loops(block)[0])
    for block in blocks:
        *outer, x = sch.get_loops(block)
        sch.parallel(sch.fuse(*outer))
        lanes = _divisor(int(sch.get(x).extent), LANES, 2)
        if lanes:
            sch.vectorize(sch.split(x, [None, lanes])[1])


def _gpu(sch: s_tir.Schedule) -> None:
    """One thread per element of every stage; ``dot`` is computed by the thread that applies
    the epilogue to it, in a register. A packed output has one thread per output word, which
    computes the codes of the word's channels into a local array, then packs every plane."""
    out = _output(sch)
    blocks = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
              if sch.get(b).name_hint in ("apad", "apack", "asum")]
    if _has(sch, "opack"):
        n, q, v, y, x = sch.get_loops(sch.get_sblock("opack"))
        sch.reorder(n, v, y, x, q)
        bx, tx = sch.split(sch.fuse(n, v, y, x), [None, GPU_THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        sch.set_scope(out, 0, "local")
        sch.compute_at(out, tx, preserve_unit_loops=True)
    else:
        blocks.append(out)
    for block in blocks:
        loops = sch.get_loops(block)
        spatial = _spatial_count(sch, block)
        bx, tx = sch.split(sch.fuse(*loops[:spatial]), [None, GPU_THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        if spatial < len(loops):
            sch.decompose_reduction(block, sch.get_loops(block)[2])
    for name in ("acc", "dot"):
        if not _has(sch, name):
            continue
        block = sch.get_sblock(name)
        sch.set_scope(block, 0, "local")
        sch.compute_at(block, sch.get_loops(out)[-1], preserve_unit_loops=True)
        loops = sch.get_loops(block)
        sch.decompose_reduction(block, loops[len(loops) - _reduce_count(sch, name)])


def _reduce_count(sch: s_tir.Schedule, name: str) -> int:
    return sum(1 for iv in sch.get(sch.get_sblock(name)).iter_vars if iv.iter_type == 2)


def _spatial_count(sch: s_tir.Schedule, block) -> int:
    return sum(1 for iv in sch.get(block).iter_vars if iv.iter_type == 0)
