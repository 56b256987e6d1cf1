"""AMX convolutions: byte codes times int8 weights on the tile unit, with the fused epilogue.

On CPUs with AMX-INT8 (Intel Sapphire Rapids and later) one ``tdpbusd`` multiplies a 16 x 64
tile of unsigned bytes by a 64 x 16 tile of signed bytes into 16 x 16 int32 sums: 16,384
multiply-adds, several times what ``vpdpbusd`` or the bit-serial popcounts do per cycle
(``benchmarks/RESULTS.md``). Low-bit codes (0..2^b-1, b <= 8) are bytes as they are, so these
kernels take every conv whose input codes stand for themselves and whose weights fit int8.

Operands are in :mod:`.amx_layout`'s layouts: the input activations channels last and padded
(:class:`Layout`), the weight interleaved (:func:`pack_weight`); :func:`pack_kernel` and
:func:`unpack_kernel` move int32 NCHW codes into and out of a layout. Each task of the conv's
parallel loop computes two 16-pixel tiles (:class:`Conv`) by 32 output channels in four
accumulator tiles over every tap and 64-channel step, stores them to a 32 x 32 int32 block on
the stack and applies the epilogue (:mod:`.epilogue`), writing int32 NCHW (codes or sums) or the
next conv's layout (codes, the border zeroed).

The process must ask Linux for the tile state once before any AMX instruction runs
(:mod:`qcompile.backends.tvm.amx_host`).
"""

import contextlib

import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as T

from qcompile.backends.tvm.kernels.amx_layout import (
    BLOCK,
    TILE_BYTES,
    TILE_ROWS,
    Conv,
    Layout,
    pack_weight,
    shared_layout,
    weight_shape,
)
from qcompile.backends.tvm.kernels.epilogue import LINEAR_LEVELS, Epilogue, epilogue_code

__all__ = ["Conv", "Layout", "available", "conv2d_kernel", "pack_kernel", "pack_weight",
           "shared_layout", "unpack_kernel"]

FEATURES = ("amx-tile", "amx-int8")


def available(target: tvm.target.Target) -> bool:
    """Whether ``target`` is an LLVM CPU with AMX-INT8."""
    return (target.kind.name == "llvm"
            and bool(tvm.target.codegen.llvm_cpu_has_features(list(FEATURES), target)))


def _header(symbol: str) -> None:
    """Name the kernel and mark it scheduled and opaque, so Relax neither re-schedules nor
    fuses it (as :func:`.direct._finish` does)."""
    T.func_name(symbol)
    T.func_attr({"global_symbol": symbol, "tir.noalias": True, "tirx.is_scheduled": True,
                 "op_pattern": 8})


def _intrin(name: str, *args):
    return T.evaluate(tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def _tile(index: int):
    return tirx.const(index, "uint8")


def _configure_tiles() -> None:
    """Load a tile configuration from a 64-byte stack block: palette 1, tiles 0-7 of 16 rows
    by 64 bytes (tiles 8-15 must stay zero)."""
    config = T.alloc_buffer((64,), "uint8", scope="local")
    with T.serial(0, 64) as i:
        T.buffer_store(config, tirx.const(0, "uint8"), [i])
    T.buffer_store(config, tirx.const(1, "uint8"), [0])
    with T.serial(0, 8) as t:
        T.buffer_store(config, tirx.const(TILE_BYTES, "uint8"), [16 + 2 * t])
        T.buffer_store(config, tirx.const(TILE_ROWS, "uint8"), [48 + t])
    _intrin("ldtilecfg", config.access_ptr("r"))


def conv2d_kernel(conv: Conv, epilogue: Epilogue, output: "Layout | None", symbol: str
                  ) -> tvm.tirx.PrimFunc:
    """A PrimFunc ``(data, weight, *epilogue inputs, out)``: ``data`` uint8 ``conv.source``
    layout, ``weight`` :func:`pack_weight`'s int8 array, ``out`` int32 (N, K, Ho, Wo) or, with
    ``output``, the codes in that uint8 layout (the epilogue must then produce codes)."""
    source, (kh, kw), s = conv.source, conv.kernel, conv.stride
    cp, kp, k_out = source.padded_channels, conv.padded_out_channels, conv.out_channels
    ho, wo = conv.out_size
    steps, pairs, blocks = cp // TILE_BYTES, conv.tiles // 2, kp // BLOCK
    n_batch = source.batch
    if output is not None and (epilogue.kind == "none" or epilogue.levels > 255
                               or (output.batch, output.channels, output.height,
                                   output.width) != (n_batch, k_out, ho, wo)):
        raise ValueError(f"{output} cannot hold this conv's {epilogue.tag} output")
    with IRBuilder() as builder, T.prim_func():
        _header(symbol)
        data = T.arg("data", T.buffer(source.shape, "uint8"))
        weight = T.arg("weight", T.buffer(weight_shape((kh, kw), cp, kp), "int8"))
        extra = [T.arg(p.name, T.buffer(tuple(int(d) for d in p.shape), p.dtype))
                 for p in epilogue.placeholders(k_out)]
        out_shape = (n_batch, k_out, ho, wo) if output is None else output.shape
        out = T.arg("out", T.buffer(out_shape, "int32" if output is None else "uint8"))
        with T.sblock("root"):
            if output is not None:
                _zero_border(out, output)
            with T.parallel(0, n_batch * pairs * blocks) as task:
                n = task // (pairs * blocks)
                block = task // pairs % blocks
                pair = task % pairs
                _configure_tiles()
                for acc in range(4):
                    _intrin("tilezero", _tile(acc))
                with T.grid(kh, kw, steps) as (i, j, q):
                    for half in range(2):
                        row = conv.start(pair * 2 + half) + i * source.padded_width + j
                        _intrin("tileloadd64", _tile(4 + half), data.access_ptr(
                            "r", offset=(n * source.rows + row) * cp + q * TILE_BYTES),
                            tirx.const(s * cp, "int64"))
                        tile = ((block * kh * kw + i * kw + j) * steps + q) * 2 + half
                        _intrin("tileloadd64", _tile(6 + half), weight.access_ptr(
                            "r", offset=tile * TILE_ROWS * TILE_BYTES),
                            tirx.const(TILE_BYTES, "int64"))
                    for a in range(2):
                        for b in range(2):
                            _intrin("tdpbusd", _tile(2 * a + b), _tile(4 + a), _tile(6 + b))
                sums = T.alloc_buffer((BLOCK, BLOCK), "int32", scope="local")
                for a in range(2):
                    for b in range(2):
                        _intrin("tilestored64", _tile(2 * a + b), sums.access_ptr(
                            "w", offset=a * TILE_ROWS * BLOCK + b * TILE_ROWS),
                            tirx.const(4 * BLOCK, "int64"))
                _intrin("tilerelease")
                _store(conv, epilogue, extra, sums, out, output, n, pair, block)
    return builder.get()


def _store(conv: Conv, epilogue: Epilogue, extra, sums, out, output, n, pair, block) -> None:
    """Write the task's 32 x 32 sums through the epilogue, valid pixels and channels only:
    a pixel's validity is tested once, its 32 channels run as one vector (the last block of
    an output channel count that is not a multiple of 32 goes one by one)."""
    ho, wo = conv.out_size
    k_out = conv.out_channels
    whole = k_out % BLOCK == 0
    extra = _staged(epilogue, extra, block, k_out)
    with T.serial(0, BLOCK) as r:
        oy, ox = conv.pixel(pair * 2 + r // TILE_ROWS, r % TILE_ROWS)
        with T.If(tirx.all(oy < ho, ox < wo)), T.Then():
            if output is not None:
                row = (oy + output.pad) * output.padded_width + ox + output.pad
            with (T.vectorized if whole else T.serial)(0, BLOCK) as c:
                k = block * BLOCK + c
                code = epilogue_code(sums[r, c], epilogue, extra, k)
                if output is None:
                    _store_if(whole, k < k_out, out, code, [n, k, oy, ox])
                else:
                    _store_if(whole, k < k_out, out, code.astype("uint8"), [n, row, k])


class _Columns:
    """A (levels, 32) stack block read as the (rows, levels) thresholds it copies."""

    def __init__(self, block, first):
        self.block, self.first = block, first

    def __getitem__(self, index):
        row, level = index
        return self.block[level, row - self.first]


def _staged(epilogue: Epilogue, extra, block, k_out: int) -> list:
    """Per-channel thresholds compared one by one, copied for the task's 32 channels into a
    block whose rows are levels, so the channel vector reads them contiguously (the stored
    (channels, levels) order is a gather)."""
    if epilogue.kind != "thresholds" or not epilogue.per_channel \
            or epilogue.levels > LINEAR_LEVELS:
        return extra
    thresholds, direction = extra
    levels = epilogue.levels
    staged = T.alloc_buffer((levels, BLOCK), epilogue.table, scope="local")
    with T.grid(levels, BLOCK) as (t, c):
        k = tirx.min(block * BLOCK + c, k_out - 1)
        T.buffer_store(staged, thresholds[k, t], [t, c])
    return [_Columns(staged, block * BLOCK), direction]


def _store_if(whole: bool, condition, buffer, value, index) -> None:
    if whole:
        T.buffer_store(buffer, value, index)
        return
    with T.If(condition), T.Then():
        T.buffer_store(buffer, value, index)


def _zero_border(out, layout: Layout) -> None:
    """Zero every row of ``layout``'s padded image outside the image itself."""
    p, wp, cp = layout.pad, layout.padded_width, layout.padded_channels
    if p == 0:
        return
    hp = layout.height + 2 * p
    with T.parallel(0, layout.batch * hp) as task:
        n, y = task // hp, task % hp
        with T.serial(0, wp) as x:
            border = tirx.any(y < p, y >= p + layout.height, x < p, x >= p + layout.width)
            with T.If(border), T.Then(), _vectors(cp) as c:
                T.buffer_store(out, tirx.const(0, "uint8"), [n, y * wp + x, c])


def pack_kernel(shape, layout: Layout, symbol: str, inputs=None, code=None
                ) -> tvm.tirx.PrimFunc:
    """A PrimFunc ``(codes, out)``: int32 (N, C, H, W) codes 0..255 into uint8 ``layout``
    (border and padded channels zero).

    With ``inputs`` (placeholders: name, shape and dtype of each kernel input) and ``code``
    (``code(buffers, n, c, y, x)``, the int32 code of that element from the input buffers), it
    stores those codes instead: a glue kernel (a requantization) that writes a layout."""
    n_batch, channels, height, width = (int(d) for d in shape)
    if inputs is None:
        inputs = [tvm.te.placeholder(shape, "int32", name="codes")]
        code = lambda buffers, *index: buffers[0][index]  # noqa: E731
    p, wp, cp = layout.pad, layout.padded_width, layout.padded_channels
    hp = height + 2 * p
    with IRBuilder() as builder, T.prim_func():
        _header(symbol)
        buffers = [T.arg(x.name, T.buffer(tuple(int(d) for d in x.shape), x.dtype))
                   for x in inputs]
        out = T.arg("out", T.buffer(layout.shape, "uint8"))
        with T.sblock("root"), T.parallel(0, n_batch * hp) as task:
            n, y = task // hp, task % hp
            inside = tirx.all(y >= p, y < p + height)
            with T.serial(0, wp) as x, _vectors(cp) as c:
                T.buffer_store(out, tirx.const(0, "uint8"), [n, y * wp + x, c])
            with T.If(inside), T.Then():
                row = T.alloc_buffer((channels, width), "uint8", scope="local")
                with T.serial(0, channels) as c, _vectors(width) as x:
                    T.buffer_store(row, code(buffers, n, c, y - p, x).astype("uint8"), [c, x])
                with T.serial(0, width) as x, _vectors(channels) as c:
                    T.buffer_store(out, row[c, x], [n, y * wp + x + p, c])
    return builder.get()


@contextlib.contextmanager
def _vectors(extent: int):
    """A loop over ``range(extent)`` in vectors of 16, 8 or 4 lanes (the widest that divides
    it), one by one if none does: a vector loop as wide as the whole extent (56 pixels, 512
    channels) took LLVM seconds to compile per kernel."""
    lanes = next((n for n in (16, 8, 4) if extent % n == 0), 1)
    with T.serial(0, extent // lanes) as outer, T.vectorized(0, lanes) as inner:
        yield outer * lanes + inner


def unpack_kernel(layout: Layout, symbol: str) -> tvm.tirx.PrimFunc:
    """A PrimFunc ``(stored, codes)``: a ``layout`` array back to int32 (N, C, H, W)."""
    p, wp = layout.pad, layout.padded_width
    shape = (layout.batch, layout.channels, layout.height, layout.width)
    with IRBuilder() as builder, T.prim_func():
        _header(symbol)
        stored = T.arg("stored", T.buffer(layout.shape, "uint8"))
        codes = T.arg("codes", T.buffer(shape, "int32"))
        with T.sblock("root"), T.parallel(0, layout.batch * layout.channels) as task:
            n, c = task // layout.channels, task % layout.channels
            with T.grid(layout.height, layout.width) as (y, x):
                T.buffer_store(codes, stored[n, (y + p) * wp + x + p, c].astype("int32"),
                               [n, c, y, x])
    return builder.get()
