"""Tile plans and schedules of the direct kernels (:mod:`.direct`), for LLVM CPUs and CUDA GPUs.

CPU conv: an output tile is a few output channels times a few pixels of one row; its
accumulators stay in registers while the reduction runs over input channels and kernel taps,
and the epilogue follows each tile (the tile is computed at the epilogue's tile loop), so
accumulators never reach memory. Tiles are spread over the cores by (batch, group, channel
block, row). The three layouts of :mod:`.direct_compute`:

- ``columns`` (VNNI): 16 pixels in the lanes times up to 16 channels unrolled; each step loads
  one activation vector and does one VNNI product per channel with a broadcast weight group;
- ``channels`` (VNNI): 16 channels in the lanes times up to 16 pixels unrolled; each step loads
  one weight vector and does one product per pixel with a broadcast activation group. The
  epilogue then reads the tile transposed, so this layout is for rows too narrow for columns;
- ``plain``: pixels in the lanes, int32 multiply-adds with a broadcast weight, 4 channels
  (depthwise: 1 channel and up to 64 pixels, as channels share no input).

:func:`conv_plan` picks the VNNI layout that pads the least (channels to the tile and to the
VNNI group; ``columns`` only for rows of a multiple of 16 pixels), and falls back to plain where
padding would cost more than VNNI gains (depthwise convs). Column tiles always divide the
output width, so no epilogue loop has a predicated tail (see :func:`conv_plan`).

CPU dense: per output row 16 partial sums, 4 rows at a time so each activation chunk is loaded
once for all of them. GPU: one thread per output element, the reduction serial in the thread.
"""

from dataclasses import dataclass

import tvm
from tvm import s_tir

from qcompile.backends.tvm.kernels import vnni
from qcompile.backends.tvm.kernels.direct_compute import round_up

VECTOR = vnni.LANES
GPU_THREADS = 128
DENSE_ROWS = 4
MAX_PADDING = 2.5
"""Padded products per real one beyond which plain int32 beats a VNNI layout (VNNI does 4
times the multiply-adds per instruction, less the packing)."""
TRANSPOSE_COST = 1.25
"""The channels layout's transposed epilogue, as a padding-like factor."""


@dataclass(frozen=True)
class ConvPlan:
    """A conv layout: ``form`` (``plain``, ``columns``, ``channels``), its VNNI ``kind`` and
    activation ``offset``, and the tile: output ``channels`` times output ``columns``."""

    form: str
    kind: vnni.DotKind | None
    offset: int
    channels: int
    columns: int


def conv_plan(shape, kind: vnni.DotKind | None, offset: int, target) -> ConvPlan:
    """The cheapest layout for ``shape``. Output columns are tiled exactly (a tile divides
    the output width): LLVM 22 miscompiles the masked AVX-512 stores it makes for a
    predicated tail of an int64 epilogue (it stores one lane too many)."""
    ow = shape.out[1]
    if target.kind.name == "cuda":
        return ConvPlan("plain", None, 0, 1, 1)
    if shape.cg == 1 and shape.kg == 1:
        columns = _exact_tile(ow, 8, 4 * VECTOR) or _exact_tile(ow, 1, 8)
        plain = ConvPlan("plain", None, 0, 1, columns)
    else:
        columns = _exact_tile(ow, 8, VECTOR) or (ow if ow <= 4 * VECTOR else _exact_tile(ow, 1, 8))
        plain = ConvPlan("plain", None, 0, min(4, shape.k), columns)
    if kind is None:
        return plain
    inputs = round_up(shape.cg, kind.group) / shape.cg
    plans = []
    kt = _channel_tile(shape.kg)
    if ow % VECTOR == 0 and (shape.groups == 1 or shape.kg % kt == 0):
        waste = inputs * round_up(shape.kg, kt) / shape.kg
        plans.append((waste, ConvPlan("columns", kind, offset, kt, VECTOR)))
    xt = _exact_tile(ow, 4, VECTOR)
    if xt and (shape.groups == 1 or shape.kg % VECTOR == 0):
        waste = inputs * round_up(shape.kg, VECTOR) / shape.kg * TRANSPOSE_COST
        plans.append((waste, ConvPlan("channels", kind, offset, VECTOR, xt)))
    best = min(plans, key=lambda p: p[0], default=None)
    return best[1] if best is not None and best[0] <= MAX_PADDING else plain


def _exact_tile(size: int, low: int, high: int) -> int:
    """``size`` itself up to ``high``, else its largest divisor in ``[low, high]``, or 0."""
    if size <= high:
        return size
    return next((t for t in range(high, low - 1, -1) if size % t == 0), 0)


def _channel_tile(channels: int) -> int:
    """Output channels per VNNI columns tile: all up to 16, else the tile that pads least."""
    if channels <= VECTOR:
        return channels
    return min(range(VECTOR, 7, -1), key=lambda t: round_up(channels, t))


def schedule_conv(func: tvm.tirx.PrimFunc, plan: ConvPlan, shape, target) -> tvm.tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    acc, out = sch.get_sblock("acc"), _output(sch)
    if target.kind.name == "cuda":
        sch.compute_inline(sch.get_sblock("padded"))
        _gpu_threads(sch, out, acc)
        return sch.mod["main"]
    n, k, y, x = sch.get_loops(out)
    lanes = VECTOR if plan.form == "channels" else plan.channels
    g, kk = sch.split(k, [shape.groups, shape.kg])
    ko, ki = sch.split(kk, [None, lanes])
    xo, xi = sch.split(x, [None, plan.columns])
    sch.reorder(n, g, ko, y, xo, ki, xi)
    sch.set_scope(acc, 0, "local")
    sch.compute_at(acc, xo)
    spatial = {"plain": {"o": plan.channels, "x": plan.columns},
               "columns": {"o": plan.channels, "x": VECTOR},
               "channels": {"x": plan.columns, "lane": VECTOR}}[plan.form]
    loops = _named_loops(sch, acc, {**spatial, **_reduce_extents(sch, acc)})
    reduction = [loops[name] for name in ("rc", "rb", "ri", "rj") if name in loops]
    inner = [loops[name] for name in (*spatial, "rt") if name in loops]
    sch.reorder(*reduction, *inner)
    unrolled, vector = {"plain": ("o", "x"), "columns": ("o", "x"),
                        "channels": ("x", "lane")}[plan.form]
    if unrolled in loops:
        sch.unroll(loops[unrolled])
    if plan.form == "plain" and vector in loops:
        sch.vectorize(loops[vector])
    sch.vectorize(xi)
    sch.parallel(sch.fuse(n, g, ko, y))
    init = sch.decompose_reduction(acc, (reduction or inner or [xo])[0])
    if plan.form != "plain":
        sch.vectorize(sch.get_loops(init)[-1])
        intrinsic = (vnni.columns_intrinsic if plan.form == "columns"
                     else vnni.broadcast_intrinsic)(plan.kind)
        sch.tensorize(loops[vector], intrinsic)
    _side_stage(sch, "padded", inner_loops=1, vector=True)
    _side_stage(sch, "packed", inner_loops=2, vector=False)
    _side_stage(sch, "wpack", inner_loops=1, vector=False)
    _side_stage(sch, "wsum", inner_loops=0, vector=False)
    return sch.mod["main"]


def schedule_dense(func: tvm.tirx.PrimFunc, kind: vnni.DotKind | None, target
                   ) -> tvm.tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    out = _output(sch)
    if target.kind.name == "cuda":
        _gpu_threads(sch, out, sch.get_sblock("acc"))
        return sch.mod["main"]
    b, o = sch.get_loops(out)
    rows = next(r for r in (DENSE_ROWS, 2, 1) if int(sch.get(o).extent) % r == 0)
    ko, ki = sch.split(o, [None, rows])
    sch.reorder(ko, b, ki)
    sch.parallel(ko)
    present = _blocks(sch)
    for name in ("hsum", "tail", "part"):
        if name in present:
            sch.set_scope(present[name], 0, "local")
            sch.compute_at(present[name], b)
    if "part" in present:
        part = present["part"]
        loops = _named_loops(sch, part, {"o": rows, "lane": VECTOR, **_reduce_extents(sch, part)})
        inner = [loops[name] for name in ("o", "lane", "rt") if name in loops]
        sch.reorder(*([loops["rb"]] if "rb" in loops else []), *inner)
        if "o" in loops:
            sch.unroll(loops["o"])
        if kind is None:
            sch.vectorize(loops["lane"])
        sch.decompose_reduction(part, loops.get("rb", inner[0]))
        if kind is not None:
            sch.tensorize(loops["lane"], vnni.lanes_intrinsic(kind))
    _side_stage(sch, "cast", inner_loops=1, vector=True)
    _side_stage(sch, "wsum", inner_loops=0, vector=False)
    return sch.mod["main"]


def _output(sch: s_tir.Schedule):
    """The output block, with the ``value`` stage inlined into the epilogue's."""
    last = sch.get_child_blocks(sch.get_sblock("root"))[-1]
    value = _blocks(sch).get("value")
    if value is not None and sch.get(last).name_hint != "value":
        sch.compute_inline(value)
    return last


def _gpu_threads(sch: s_tir.Schedule, out, acc) -> None:
    """One thread per output element, its accumulator in a register."""
    if sch.get(out).name_hint == "acc":
        out = sch.cache_write(acc, 0, "local")
    else:
        sch.set_scope(acc, 0, "local")
    bx, tx = sch.split(sch.fuse(*sch.get_loops(out)), [None, GPU_THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.compute_at(acc, tx)


def _side_stage(sch: s_tir.Schedule, name: str, inner_loops: int, vector: bool) -> None:
    """A stage before the main loop, parallel over its outer spatial loops; the last
    ``inner_loops`` stay inside, the innermost unrolled, or vectorized when ``vector``."""
    block = _blocks(sch).get(name)
    if block is None:
        return
    spatial = sch.get_loops(block)[:_spatial_count(sch, block)]
    inner = min(inner_loops, len(spatial) - 1)
    outer = spatial[:len(spatial) - inner]
    if inner and vector and int(sch.get(spatial[-1]).extent) % VECTOR == 0:
        _, lanes = sch.split(spatial[-1], [None, VECTOR])
        sch.vectorize(lanes)
    elif inner and inner_loops > 1:
        sch.unroll(spatial[-1])
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _named_loops(sch: s_tir.Schedule, block, extents: dict[str, int]) -> dict:
    """The loops ``compute_at`` made for ``block``'s iterators of ``extents`` (in order), by
    name; ``compute_at`` makes no loop for an iterator of extent 1."""
    names = [name for name, extent in extents.items() if extent > 1]
    return dict(zip(names, sch.get_loops(block)[-len(names):], strict=True)) if names else {}


def _reduce_extents(sch: s_tir.Schedule, block) -> dict[str, int]:
    return {iv.var.name.removeprefix("v_"): int(iv.dom.extent)
            for iv in sch.get(block).iter_vars if iv.iter_type == 2}


def _spatial_count(sch: s_tir.Schedule, block) -> int:
    return sum(1 for iv in sch.get(block).iter_vars if iv.iter_type == 0)


def _blocks(sch: s_tir.Schedule) -> dict:
    return {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}
