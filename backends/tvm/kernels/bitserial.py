"""Bit-serial conv2d and dense on packed low-bit weights, as scheduled TVM PrimFuncs.

A low-bit dot product is a weighted sum of popcounts of bit-planes (Umuroglu & Jahre 2017;
Cowan et al. 2020, "Automatic generation of high-performance quantized machine learning
kernels"): with weight code ``u_w = sum_p 2^p w_p`` and activation code ``u_a = sum_q 2^q a_q``,

    sum_c u_w[c] u_a[c] = sum_{p,q} 2^(p+q) popcount(w_p AND a_q)

where ``w_p`` and ``a_q`` are planes packed along the channels (:mod:`qcompile.packing`). A
weight form maps the code to the integer ``alpha u_w - beta`` (unsigned ``(1, 0)``, signed
``(1, 2^(b-1))``, bipolar ``(2, 2^b - 1)``, or any pair given as such), so the accumulator is
``alpha * dot - beta * sum_q 2^q popcount(a_q)``: the second sum is taken once per output pixel
(stage ``asum``) and is the initial value of the popcount reduction (stage ``dot``). The CPU
plan may keep one accumulator per weight ``2^(p+q)`` (``classes``), summed with their shifts
after the reduction (stage ``acc``), which saves the shift and add per popcount. Popcounts
are cast to signed integers before anything is subtracted (TVM marks unsigned subtraction
``nuw``, which makes a negative difference poison).

Each kernel is one PrimFunc. The activation codes are packed into planes inside it (stage
``apad``, zero padding included; for a column stride above 1 also ``apack``, the columns split by
stride phase, so the pixels of an output row read consecutive words whatever the stride). On the
CPU the words are 64 bits wide: AVX-512 counts 64-bit lanes twice as fast as 32-bit ones
(``vpopcntq`` 2 per cycle, ``vpopcntd`` 1 on Zen 5), and a 64-bit weight word is two consecutive
uint32 words of the packed weight, read as one. The accumulator is int64 there (int32 values:
no narrowing and widening before the epilogue) and int32 on the GPU. ``out`` (or
``requantized``) applies the :class:`Epilogue` and stores int32.

Packed activations (:mod:`.bitserial_packed`): with ``packed_input`` the kernel reads planes
already packed, ``(N, a_bits, ceil(C / word), H, W)`` words, pixels innermost, which is the
layout of ``apad`` itself: ``apad`` becomes a zero-bordered copy (none at all when the conv needs
no padding), so a layer whose producer is bit-serial packs nothing. With ``packed_output`` a
requantizing conv stores its codes in that layout for the next layer (stage ``opack``, planes of
the output channels): the tiles of one output word's channels leave their codes in a small buffer
and the word's planes are packed from it, so int32 codes never reach memory.
:mod:`.bitserial_schedules` schedules the stages for the CPU or the GPU.

Relax: the PrimFunc carries ``tirx.is_scheduled`` (the default pipelines leave it as it is) and
``op_pattern`` 8 (opaque: ``FuseOps`` keeps it whole), and a ``global_symbol`` unique to its
configuration; ``bb.add_func`` + ``relax.call_tir`` with the output's ``TensorType`` call it.
"""

import tvm
from tvm import te
from tvm import tirx as T

from qcompile.backends.tvm.kernels import bitserial_schedules as schedules
from qcompile.backends.tvm.kernels.bitserial_packed import (
    output_planes, pack_codes, pack_stage, packed_dtype, packed_shape, packed_word, unpack_codes)
from qcompile.backends.tvm.kernels.epilogue import Epilogue, apply_epilogue
from qcompile.errors import ConfigError

__all__ = ["Epilogue", "conv2d_kernel", "dense_kernel", "pack_codes", "packed_shape",
           "unpack_codes"]

WORD = 32
"""Bits per word of the packed weight (:data:`qcompile.packing.WORD_BITS`)."""
FORMS = {"unsigned": lambda bits: (1, 0), "signed": lambda bits: (1, 2 ** (bits - 1)),
         "bipolar": lambda bits: (2, 2**bits - 1)}
"""Weight form -> ``(alpha, beta)`` with the weight integer ``alpha * u_w - beta``."""


def conv2d_kernel(shape_in, weight_shape, a_bits, w_bits, form, stride, padding, dilation,
                  epilogue: Epilogue, target, *, packed_input: bool = False,
                  packed_output: bool | int = False) -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc ``(data, weight, *epilogue inputs, out)`` for a groups-1 conv2d.

    ``data`` int32 ``shape_in`` (N, C, H, W) holds unsigned ``a_bits`` codes; ``weight`` uint32
    ``(w_bits, K, kh, kw, ceil(C / 32))`` is ``pack_bits(u_w, w_bits, axis=1)``, and
    ``weight_shape`` is that shape (or the unpacked ``(K, C, kh, kw)``); ``out`` int32
    (N, K, OH, OW). ``stride``, ``padding`` and ``dilation`` are ints or (h, w) pairs; padding
    is symmetric zero padding.

    ``packed_input``: ``data`` holds the codes in the packed layout of :mod:`.bitserial_packed`
    instead, ``packed_shape(shape_in, a_bits, target)`` words. ``packed_output`` (a requantizing
    epilogue only): ``out`` holds the output codes in that layout, ``packed_shape((N, K, OH,
    OW), bits, target)``, with ``bits`` the planes the codes need (``True``) or given (an int).
    """
    _check(a_bits, w_bits, form)
    n, c, h, w = _shape(shape_in, 4, "conv input")
    k, kh, kw = _weight_dims(weight_shape, c, w_bits, 4)
    (sh, sw), (ph, pw), (dh, dw) = (_pair(v, name) for v, name in
                                    ((stride, "stride"), (padding, "padding"),
                                     (dilation, "dilation")))
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ConfigError(f"conv of a {h}x{w} input with a {kh}x{kw} kernel, padding "
                          f"{(ph, pw)} and dilation {(dh, dw)} has no output pixel")
    out_bits = output_planes(packed_output, epilogue, k, target)
    plan = schedules.conv_plan(target, k, ow, w_bits, a_bits, packed_output=bool(out_bits))
    words, owp = -(-c // plan.word), -(-ow // plan.row) * plan.row
    data = _input(shape_in, a_bits, packed_input, target)
    weight = te.placeholder((w_bits, k, kh, kw, -(-c // WORD)), "uint32", "weight")
    extra = epilogue.placeholders(k)
    plane = _conv_planes(data, (n, c, h, w), a_bits, plan.word, (oh, owp), (kh, kw), (sh, sw),
                         (ph, pw), (dh, dw))
    alpha, beta = _coefficients(form, w_bits)
    si, sj, sv, sq = _axes(("si", kh), ("sj", kw), ("sv", words), ("sq", a_bits))
    asum = te.compute((n, oh, owp), lambda b, y, x: te.sum(
        (_popcount(plane(b, sq, sv, y, x, si, sj), plan.accumulator) << sq) * -beta,
        axis=[si, sj, sv, sq]), "asum")
    ri, rj, rw, rp, rq = _axes(("ri", kh), ("rj", kw), ("rw", words), ("rp", w_bits),
                               ("rq", a_bits))

    def term(b, cls, o, y, x):
        count = _popcount(_weight_word(lambda v: weight[rp, o, ri, rj, v], c, rw, plan.word)
                          & plane(b, rq, rw, y, x, ri, rj), plan.accumulator)
        if plan.classes == 1:
            return count << (rp + rq + alpha - 1).astype(plan.accumulator)
        return T.if_then_else(rp + rq == cls, count << (alpha - 1), T.const(0, plan.accumulator))

    dot = te.compute((n, plan.classes, k, oh, owp), lambda b, cls, o, y, x: te.sum(
        term(b, cls, o, y, x), axis=[ri, rj, rw, rp, rq],
        init=asum[b, y, x] if beta else None), "dot")
    rc = te.reduce_axis((0, plan.classes), "rc")
    acc = te.compute((n, k, oh, ow), lambda b, o, y, x: te.sum(
        dot[b, rc, o, y, x] << rc.var.astype(plan.accumulator), axis=rc), "acc")
    out = _stored(acc, epilogue, extra)
    if out_bits:
        out = pack_stage(out, out_bits, plan.word, "opack")
    func = te.create_prim_func([data, weight, *extra, out])
    name = (f"bitserial_conv2d_n{n}c{c}h{h}w{w}_k{k}x{kh}x{kw}_s{sh}x{sw}p{ph}x{pw}d{dh}x{dw}"
            f"_a{a_bits}w{w_bits}{_form_tag(form)}_{epilogue.tag}"
            f"{_layout_tag(packed_input, out_bits)}_{target.kind.name}")
    return _finish(schedules.schedule_conv(func, plan, target), name)


def dense_kernel(shape_in, weight_shape, a_bits, w_bits, form, epilogue: Epilogue,
                 target, *, packed_input: bool = False) -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc ``(data, weight, *epilogue inputs, out)`` for a dense layer.

    ``data`` int32 (N, C) holds unsigned ``a_bits`` codes; ``weight`` uint32
    ``(w_bits, K, ceil(C / 32))`` is ``pack_bits(u_w, w_bits, axis=1)``, and ``weight_shape``
    is that shape (or the unpacked ``(K, C)``); ``out`` int32 (N, K). ``packed_input``: ``data``
    holds the codes packed, ``packed_shape(shape_in, a_bits, target)`` words.
    """
    _check(a_bits, w_bits, form)
    n, c = _shape(shape_in, 2, "dense input")
    (k,) = _weight_dims(weight_shape, c, w_bits, 2)
    plan = schedules.dense_plan(target)
    bits, words = plan.word, -(-c // plan.word)
    data = _input((n, c), a_bits, packed_input, target)
    weight = te.placeholder((w_bits, k, -(-c // WORD)), "uint32", "weight")
    extra = epilogue.placeholders(k)
    apack = data if packed_input else te.compute((n, a_bits, words), lambda b, q, word:
                                                 packed_word(lambda ch: data[b, ch], c, word, q,
                                                             bits), "apack")
    alpha, beta = _coefficients(form, w_bits)
    sv, sq = _axes(("sv", words), ("sq", a_bits))
    asum = te.compute((n,), lambda b: te.sum(
        (_popcount(apack[b, sq, sv], plan.accumulator) << sq) * -beta, axis=[sv, sq]), "asum")
    rw, rp, rq = _axes(("rw", words), ("rp", w_bits), ("rq", a_bits))
    dot = te.compute((n, k), lambda b, o: te.sum(
        _popcount(_weight_word(lambda v: weight[rp, o, v], c, rw, bits) & apack[b, rq, rw],
                  plan.accumulator) << (rp + rq + alpha - 1).astype(plan.accumulator),
        axis=[rw, rp, rq], init=asum[b] if beta else None), "dot")
    acc = te.compute((n, k), lambda b, o: dot[b, o], "acc")
    out = _stored(acc, epilogue, extra)
    func = te.create_prim_func([data, weight, *extra, out])
    name = (f"bitserial_dense_n{n}c{c}_k{k}_a{a_bits}w{w_bits}{_form_tag(form)}_{epilogue.tag}"
            f"{_layout_tag(packed_input, 0)}_{target.kind.name}")
    return _finish(schedules.schedule_dense(func, plan, target), name)


def _input(shape, a_bits: int, packed: bool, target) -> te.Tensor:
    if packed:
        return te.placeholder(packed_shape(shape, a_bits, target), packed_dtype(target), "data")
    return te.placeholder(shape, "int32", "data")


def _conv_planes(data: te.Tensor, shape, a_bits: int, bits: int, out_size, kernel, stride,
                 padding, dilation):
    """The ``bits``-wide plane words with zero padding (stage ``apad``: packed from the codes,
    or a padded copy of packed ``data``; split by column stride phase in ``apack``) and return
    ``plane(b, q, word, y, x, i, j)``, the word under kernel tap ``(i, j)`` of output pixel
    ``(y, x)``. Packed ``data`` that needs no padding is read as it is."""
    n, c, h, w = shape
    (oh, owp), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = out_size, kernel, stride, padding, dilation
    hp, wq = (oh - 1) * sh + (kh - 1) * dh + 1, owp + (kw - 1) * dw // sw
    packed = str(data.dtype) != "int32"
    guarded = bool(ph or pw or hp > h or wq * sw > w)

    def padded(b, q, word, y, col):
        if packed:
            value = data[b, q, word, y - ph, col - pw]
        else:
            value = packed_word(lambda ch: data[b, ch, y - ph, col - pw], c, word, q, bits)
        if not guarded:
            return value
        inside = T.all(y >= ph, y < h + ph, col >= pw, col < w + pw)
        return T.if_then_else(inside, value, T.const(0, f"uint{bits}"))

    if packed and not guarded:
        apad = data
    else:
        apad = te.compute((n, a_bits, -(-c // bits), hp, wq * sw), padded, "apad")
    if sw == 1:
        return lambda b, q, word, y, x, i, j: apad[b, q, word, y * sh + i * dh, x + j * dw]
    apack = te.compute((n, a_bits, -(-c // bits), hp, sw, wq),
                       lambda b, q, word, y, phase, xq: apad[b, q, word, y, xq * sw + phase],
                       "apack")
    return lambda b, q, word, y, x, i, j: apack[b, q, word, y * sh + i * dh, j * dw % sw,
                                                x + j * dw // sw]


def _stored(acc: te.Tensor, epilogue: Epilogue, extra: list[te.Tensor]) -> te.Tensor:
    """The int32 output: the accumulator itself or its requantized codes. The accumulator
    (int64 on the CPU) goes into the epilogue as it is: it holds an int32 value, so widening
    a narrowed copy would only cost two shifts per vector."""
    if epilogue.kind == "none":
        return te.compute(acc.shape, lambda *i: T.Cast("int32", acc(*i)), "out")
    return apply_epilogue(acc, epilogue, extra)


def _weight_word(read, channels: int, word, bits: int):
    """Word ``word`` (``bits`` wide) of a weight plane, from its uint32 words ``read(v)``:
    uint32 word ``v`` is bits ``32 (v % r)`` on of word ``v // r``, ``r = bits / 32`` (the
    LSB-first layout of :mod:`qcompile.packing` read in wider words)."""
    if bits == WORD:
        return read(word)
    parts, last = bits // WORD, (channels - 1) // WORD
    total = None
    for part in range(parts):
        v = word * parts + part
        value = T.Cast(f"uint{bits}", read(T.min(v, last))) << T.const(part * WORD, f"uint{bits}")
        if (-(-channels // bits) * parts - parts + part) > last:
            value = T.if_then_else(v <= last, value, T.const(0, f"uint{bits}"))
        total = value if total is None else total | value
    return total


def _layout_tag(packed_input: bool, out_bits: int) -> str:
    return ("_pi" if packed_input else "") + (f"_po{out_bits}" if out_bits else "")


def _popcount(x, dtype: str):
    return T.Cast(dtype, T.popcount(x))


def _axes(*extents):
    return [te.reduce_axis((0, extent), name) for name, extent in extents]


def _finish(func: tvm.tirx.PrimFunc, name: str) -> tvm.tirx.PrimFunc:
    """Name the kernel and mark it scheduled and opaque, so Relax neither re-schedules
    (dlight skips ``tirx.is_scheduled``) nor fuses it (``op_pattern`` 8 is opaque)."""
    return func.with_attrs({"global_symbol": name, "tirx.is_scheduled": True, "op_pattern": 8})


def _shape(shape, rank: int, what: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if len(shape) != rank or min(shape) < 1:
        raise ConfigError(f"{what} shape must be {rank} positive sizes, got {shape}")
    return shape


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < (0 if name == "padding" else 1):
        raise ConfigError(f"conv2d {name} must be an int or an (h, w) pair, got {value!r}")
    return pair


def _weight_dims(shape, channels: int, w_bits: int, rank: int) -> tuple[int, ...]:
    """(K, *kernel) from a packed ``(w_bits, K, *kernel, words)`` or unpacked ``(K, C, *kernel)``
    weight shape, checked against the input's ``channels``."""
    shape = _shape(shape, len(tuple(shape)), "weight")
    words = -(-channels // WORD)
    if len(shape) == rank + 1 and shape[0] == w_bits and shape[-1] == words:
        return shape[1:-1]
    if len(shape) == rank and shape[1] == channels:
        return (shape[0], *shape[2:])
    raise ConfigError(f"weight shape {shape} does not fit {channels} input channels and "
                      f"{w_bits}-bit weights: expected the packed ({w_bits}, K, ..., {words}) or "
                      f"the unpacked (K, {channels}, ...); bit-serial kernels support groups=1")


def _coefficients(form, w_bits: int) -> tuple[int, int]:
    """``(alpha, beta)`` of a named form, or the pair itself (any affine ``alpha u_w - beta``,
    e.g. ternary weights ``u_w - 1`` at 2 bits)."""
    return FORMS[form](w_bits) if isinstance(form, str) else (int(form[0]), int(form[1]))


def _form_tag(form) -> str:
    return form[0] if isinstance(form, str) else f"x{form[0]}m{form[1]}"


def _check(a_bits: int, w_bits: int, form) -> None:
    affine = (isinstance(form, tuple) and len(form) == 2 and int(form[0]) >= 1)
    if form not in FORMS and not affine:
        raise ConfigError(f"weight form must be one of {', '.join(FORMS)} or an (alpha, beta) "
                          f"pair, got {form!r}; tabled levels need another kernel")
    for bits, what in ((a_bits, "activation"), (w_bits, "weight")):
        if not 1 <= bits <= 8:
            raise ConfigError(f"{what} bits must be in [1, 8], got {bits}")
