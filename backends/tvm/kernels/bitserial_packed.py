"""The packed activation layout that bit-serial layers pass to each other, and its conversions.

A tensor of unsigned ``bits``-bit codes of shape ``(N, C, *spatial)`` (channels on axis 1) is
stored as ``bits`` planes of ``word``-bit words of shape ``(N, bits, ceil(C / word), *spatial)``:
bit ``b`` of word ``v`` in plane ``q`` is bit ``q`` of the code of channel ``word * v + b``
(LSB-first, as :mod:`qcompile.packing` packs weights), and the bits past the last channel are
zero. ``word`` is 64 on the CPU (``uint64``: AVX-512 counts 64-bit lanes twice as fast as 32-bit
ones) and 32 on CUDA (``uint32``: ``__popc``); on a little-endian CPU a 64-bit word is the two
32-bit words of :func:`qcompile.packing.pack_bits` in order.

Why this order: it is the order in which a bit-serial conv reads its activations. Pixels are
innermost, so the conv's inner loop, which ANDs one weight word with the words of 8 consecutive
output pixels, loads one contiguous vector; one plane of one channel word is a whole image,
which the loops over kernel taps stream row by row. The packed tensor holds ``bits`` bits per
code where int32 codes take 32 (plus the padding of the last word).

:func:`pack_codes` and :func:`unpack_codes` are kernels for the boundaries between the layout
and int32 codes (a layer that is not bit-serial produces or consumes the value);
:func:`packed_word` is the packing expression the bit-serial kernels inline.
"""

import tvm
from tvm import s_tir, te
from tvm import tirx as T

from qcompile.errors import ConfigError

__all__ = ["output_planes", "pack_codes", "pack_stage", "packed_dtype", "packed_shape",
           "packed_word", "packing_kernel", "unpack_codes", "word_bits"]

GPU_THREADS = 128
LANES = 8


def word_bits(target) -> int:
    """Bits per word of the packed layout on ``target``: 32 on CUDA, 64 on the CPU."""
    return 32 if target.kind.name == "cuda" else 64


def packed_dtype(target) -> str:
    return f"uint{word_bits(target)}"


def packed_shape(shape, bits: int, target) -> tuple[int, ...]:
    """``(N, bits, ceil(C / word), *spatial)`` for codes of ``shape`` ``(N, C, *spatial)``."""
    shape = _codes_shape(shape)
    return (shape[0], bits, -(-shape[1] // word_bits(target)), *shape[2:])


def packed_word(read, channels: int, word, q, bits: int):
    """Word ``word`` (``bits`` wide) of plane ``q``: bit ``b`` is bit ``q`` of ``read(ch)``, the
    code of channel ``ch = bits * word + b``, and zero past the last channel (the reads of bits
    that fall past it in the last word are clamped to it). A 64-bit word is built from two
    32-bit halves: 32-bit lanes are twice as many per vector, and need no widening per code."""
    if bits == 32:
        return _packed_half(read, channels, word, 0, q, 1)
    low = _packed_half(read, channels, word, 0, q, 2)
    if channels <= 32:
        return T.Cast("uint64", low)
    high = _packed_half(read, channels, word, 1, q, 2)
    return T.Cast("uint64", low) | (T.Cast("uint64", high) << T.const(32, "uint64"))


def _packed_half(read, channels: int, word, half: int, q, halves: int):
    """The 32-bit half ``half`` of ``halves`` of a packed word."""
    last = (channels - 1) // (32 * halves)
    total = None
    for b in range(min(32, channels - half * 32)):
        ch = (word * halves + half) * 32 + b
        past = (last * halves + half) * 32 + b >= channels
        bit = (T.Cast("uint32", read(T.min(ch, channels - 1) if past else ch))
               >> T.Cast("uint32", q)) & T.const(1, "uint32")
        term = bit << T.const(b, "uint32")
        if past:
            term = T.if_then_else(ch < channels, term, T.const(0, "uint32"))
        total = term if total is None else total | term
    return total


def pack_stage(codes: te.Tensor, bits: int, word: int, name: str) -> te.Tensor:
    """The TE compute packing int32 ``codes`` (channels on axis 1) into the layout. A single
    channel is read at the constant 0: the schedule's region analysis fails on the lone index
    ``v * word``."""
    n, c, *spatial = (int(d) for d in codes.shape)
    return te.compute((n, bits, -(-c // word), *spatial), lambda b, q, v, *pixel: packed_word(
        lambda ch: codes[(b, ch, *pixel)], c, v if c > 1 else 0, q, word), name)


def output_planes(packed_output, epilogue, channels: int, target) -> int:
    """Planes of a conv's packed output (0: int32 output) from its ``packed_output`` option:
    ``True`` for the bits of the codes, or an int at least that. The epilogue must requantize,
    and the channels fill whole words or one word: each output word is packed from the codes of
    its channels, which the tiles of that word leave in a local buffer."""
    if packed_output is False:
        return 0
    if epilogue.kind == "none" or epilogue.levels < 1:
        raise ConfigError("a packed output holds requantized codes: give the kernel a "
                          "thresholds or fixed_point epilogue, or store the int32 accumulator")
    needed = epilogue.levels.bit_length()
    bits = needed if packed_output is True else int(packed_output)
    if not needed <= bits <= 8:
        raise ConfigError(f"codes up to {epilogue.levels} need {needed} to 8 packed output "
                          f"planes, got {bits}")
    word = word_bits(target)
    if channels > word and channels % word:
        raise ConfigError(f"a packed output of {channels} channels needs a multiple of {word} "
                          f"channels or at most {word} on {target.kind.name}: store int32 "
                          f"codes and pack them with pack_codes")
    return bits


def pack_codes(shape, bits: int, target) -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc ``(codes, packed)``: int32 ``bits``-bit codes of ``shape``
    ``(N, C, *spatial)`` into :func:`packed_shape` words of :func:`packed_dtype`."""
    shape, bits = _codes_shape(shape), _bits(bits)
    codes = te.placeholder(shape, "int32", "codes")
    packed = pack_stage(codes, bits, word_bits(target), "packed")
    return packing_kernel(te.create_prim_func([codes, packed]), target,
                          f"pack_codes_{_tag(shape)}_b{bits}_{target.kind.name}")


def unpack_codes(shape, bits: int, target) -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc ``(packed, codes)``, the inverse of :func:`pack_codes`: ``shape``
    is the codes' ``(N, C, *spatial)``."""
    shape, bits = _codes_shape(shape), _bits(bits)
    word = word_bits(target)
    packed = te.placeholder(packed_shape(shape, bits, target), f"uint{word}", "packed")

    def code(b, ch, *pixel):
        total = T.const(0, "int32")
        for q in range(bits):
            bit = (packed[(b, q, ch // word, *pixel)] >> T.Cast(f"uint{word}", ch % word)) \
                & T.const(1, f"uint{word}")
            total = total | (T.Cast("int32", bit) << q)
        return total

    codes = te.compute(shape, code, "codes")
    return _finish(_schedule(te.create_prim_func([packed, codes]), "codes", target),
                   f"unpack_codes_{_tag(shape)}_b{bits}_{target.kind.name}")


def packing_kernel(func: tvm.tirx.PrimFunc, target, symbol: str) -> tvm.tirx.PrimFunc:
    """``func``, whose output is a :func:`pack_stage` named ``packed`` of int32 codes (an input,
    or a stage before that computes them elementwise, such as a requantization), scheduled. On
    the CPU a task packs one word's channels; computed codes go first into a local buffer,
    vectorized, so each is computed once and only the words reach memory. A task covers one
    row when the row fills whole vectors, else a whole plane (the pixels as one vector loop: a
    28-wide row would make 7-lane vectors, a 28x28 plane makes 8-lane ones). On CUDA (or
    without a spatial axis) computed codes are inlined into one thread per word."""
    sch = s_tir.Schedule(func)
    *before, packed = sch.get_child_blocks(sch.get_sblock("root"))
    for block in before[:-1]:
        sch.compute_inline(block)
    codes = before[-1] if before else None
    loops = sch.get_loops(packed)
    if target.kind.name == "cuda" or len(loops) < 4:
        if codes is not None:
            sch.compute_inline(codes)
        return _finish(_schedule(sch.mod["main"], "packed", target), symbol)
    b, q, v, *rows, x = loops
    if int(sch.get(x).extent) % LANES == 0 or not rows:
        sch.reorder(b, v, *rows, q, x)
        task, pixels = sch.fuse(b, v, *rows), x
    else:
        sch.reorder(b, v, q, *rows, x)
        task, pixels = sch.fuse(b, v), sch.fuse(*rows, x)
    sch.parallel(task)
    vector_loops = [pixels]
    if codes is not None:
        sch.compute_at(codes, task, preserve_unit_loops=True)
        spatial = sch.get_loops(codes)[3:]
        vector_loops.append(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
    for inner in vector_loops:
        extent = int(sch.get(inner).extent)
        lanes = next((d for d in (LANES, 4, 2) if extent % d == 0), 0)
        if lanes:
            sch.vectorize(sch.split(inner, [None, lanes])[1])
    return _finish(sch.mod["main"], symbol)


def _schedule(func: tvm.tirx.PrimFunc, name: str, target) -> tvm.tirx.PrimFunc:
    """GPU: one thread per element. CPU: parallel over all but the innermost axis, which is
    vectorized when it divides into vectors."""
    sch = s_tir.Schedule(func)
    block = sch.get_sblock(name)
    loops = sch.get_loops(block)
    if target.kind.name == "cuda":
        bx, tx = sch.split(sch.fuse(*loops), [None, GPU_THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        return sch.mod["main"]
    *outer, inner = loops
    sch.parallel(sch.fuse(*outer))
    extent = int(sch.get(inner).extent)
    lanes = next((d for d in range(LANES, 1, -1) if extent % d == 0), 0)
    if lanes:
        sch.vectorize(sch.split(inner, [None, lanes])[1])
    return sch.mod["main"]


def _finish(func: tvm.tirx.PrimFunc, name: str) -> tvm.tirx.PrimFunc:
    return func.with_attrs({"global_symbol": name, "tirx.is_scheduled": True, "op_pattern": 8})


def _codes_shape(shape) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ConfigError(f"packed codes need a shape (N, C, *spatial) of positive sizes, got "
                          f"{shape}")
    return shape


def _bits(bits: int) -> int:
    if not 1 <= int(bits) <= 8:
        raise ConfigError(f"packed codes have 1 to 8 bits, got {bits}")
    return int(bits)


def _tag(shape) -> str:
    return "x".join(str(d) for d in shape)
