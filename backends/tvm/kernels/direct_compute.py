"""The TE computes of the direct kernels (:mod:`.direct`), one per kernel layout.

Every compute ends in a ``value`` stage holding the exact int32 accumulator in NCHW (or NK)
order, followed by the shared epilogue; the stages before it choose how the sum is formed:

- :func:`conv_plain`: int32 products of the zero-padded input (``padded``) and the weight;
- :func:`conv_columns`: VNNI products, lanes over 16 output pixels of a row. Activations are
  packed (``packed``, N x groups x C-groups x rows x phase x columns x group) so that a tap of
  16 neighbouring output pixels reads one contiguous vector, even at stride ``s`` (the input
  columns are split by their phase modulo ``s``); weights (``wpack``) are broadcast a group of
  input channels at a time;
- :func:`conv_channels`: VNNI products, lanes over 16 output channels (``wpack`` holds a vector
  of channels per input-channel group, activations are broadcast), for narrow outputs;
- :func:`dense_lanes`: per row 16 partial sums over chunks of the feature axis (``part``),
  summed (``hsum``), plus the leftover features (``tail``); :func:`dense_simple` for GPUs.

VNNI layouts subtract ``offset * wsum`` when activations were shifted into bytes.
"""

from dataclasses import dataclass

from tvm import te
from tvm import tirx as T

from qcompile.backends.tvm.kernels.epilogue import Epilogue, apply_epilogue
from qcompile.backends.tvm.kernels.vnni import LANES, DotKind


@dataclass(frozen=True)
class ConvShape:
    """A conv2d's sizes; ``stride``, ``padding``, ``dilation`` are (h, w) pairs."""

    n: int
    c: int
    h: int
    w: int
    k: int
    kh: int
    kw: int
    groups: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def cg(self) -> int:
        return self.c // self.groups

    @property
    def kg(self) -> int:
        return self.k // self.groups

    @property
    def out(self) -> tuple[int, int]:
        return tuple((size + 2 * p - d * (kernel - 1) - 1) // s + 1 for size, kernel, s, p, d in
                     zip((self.h, self.w), (self.kh, self.kw), self.stride, self.padding,
                         self.dilation))

    def rows_cols(self, width: int) -> tuple[int, int]:
        """Padded input rows and columns that ``OH`` rows and ``width`` columns of output read."""
        (sh, sw), (dh, dw) = self.stride, self.dilation
        return ((self.out[0] - 1) * sh + (self.kh - 1) * dh + 1,
                (width - 1) * sw + (self.kw - 1) * dw + 1)

    def tap(self, y, x, i, j):
        """Padded input coordinates of output ``(y, x)``'s tap ``(i, j)``."""
        (sh, sw), (dh, dw) = self.stride, self.dilation
        return y * sh + i * dh, x * sw + j * dw

    def padded(self, read, y, x):
        """``read(row, col)`` at padded input coordinates, 0 outside the input."""
        ph, pw = self.padding
        inside = T.all(y >= ph, y < self.h + ph, x >= pw, x < self.w + pw)
        return T.if_then_else(inside, read(_clamp(y - ph, self.h), _clamp(x - pw, self.w)),
                              T.const(0, "int32"))

    @property
    def tag(self) -> str:
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        return (f"n{self.n}c{self.c}h{self.h}w{self.w}_k{self.k}x{self.kh}x{self.kw}"
                f"g{self.groups}_s{sh}x{sw}p{ph}x{pw}d{dh}x{dw}")


def conv_plain(s: ConvShape, dtype: str, epilogue: Epilogue, channels: int, columns: int
               ) -> list[te.Tensor]:
    """``acc`` (N, K, OH, OW), channels and columns padded to whole tiles."""
    oh, ow = s.out
    kp, owp = round_up(s.k, channels), round_up(ow, columns)
    data, weight, extra = _conv_inputs(s, dtype, epilogue)
    padded = te.compute((s.n, s.c, *s.rows_cols(owp)), lambda b, ch, y, x: s.padded(
        lambda row, col: data[b, ch, row, col], y, x), "padded")
    rc, ri, rj = axes(("rc", s.cg), ("ri", s.kh), ("rj", s.kw))

    def product(b, o, y, x):
        o = T.min(o, s.k - 1)
        return padded[b, o // s.kg * s.cg + rc, *s.tap(y, x, ri, rj)] * weight[
            o, rc, ri, rj].astype("int32")

    acc = te.compute((s.n, kp, oh, owp), lambda b, o, y, x: te.sum(
        product(b, o, y, x), axis=[rc, ri, rj]), "acc")
    value = te.compute((s.n, s.k, oh, ow), lambda b, o, y, x: acc[b, o, y, x], "value")
    return [data, weight, *extra, apply_epilogue(value, epilogue, extra)]


def conv_columns(s: ConvShape, dtype: str, kind: DotKind, offset: int, epilogue: Epilogue,
                 channels: int, prepacked: bool = False) -> list[te.Tensor]:
    """``acc`` (N, groups, Kg, OH, OW) from ``packed`` activations (lanes along a row) and
    ``wpack`` weights (groups, Kg, C-groups, kh, kw, group), broadcast. With ``prepacked`` the
    weight input is already ``wpack`` (see :func:`weight_layout`)."""
    q, (sh, sw), (dh, dw) = kind.group, s.stride, s.dilation
    oh, ow = s.out
    cb, owp = -(-s.cg // q), round_up(ow, LANES)
    rows = s.rows_cols(owp)[0]
    width = owp + (s.kw - 1) * dw // sw
    data, weight, extra = _conv_inputs(s, dtype, epilogue, kind, "columns", channels, prepacked)

    def pack(b, g, block, y, phase, x, t):
        return _shifted(s, data, kind, offset, b, g, block * q + t, y, x * sw + phase)

    def wpack(g, o, block, i, j, t):
        return _weight_entry(s, weight, kind, g, o, block * q + t, i, j)

    packed = te.compute((s.n, s.groups, cb, rows, sw, width, q), pack, "packed")
    wpacked = weight if prepacked else te.compute(
        weight_layout(s, kind, "columns", channels)[0], wpack, "wpack")
    rb, ri, rj, rt = axes(("rb", cb), ("ri", s.kh), ("rj", s.kw), ("rt", q))
    acc = te.compute((s.n, s.groups, wpacked.shape[1], oh, owp), lambda b, g, o, y, x: te.sum(
        packed[b, g, rb, y * sh + ri * dh, rj * dw % sw, x + rj * dw // sw, rt].astype("int32")
        * wpacked[g, o, rb, ri, rj, rt].astype("int32"), axis=[rb, ri, rj, rt]), "acc")

    def weight_at(o, cin, i, j):
        return wpacked[o // s.kg, o % s.kg, cin // q, i, j, cin % q]

    return _conv_value(s, weight_at if prepacked else _unpacked(weight), offset, epilogue,
                       [data, weight, *extra], _group_index(s, lambda b, g, o, y, x: acc[
                           b, g, o, y, x]))


def conv_channels(s: ConvShape, dtype: str, kind: DotKind, offset: int, epilogue: Epilogue,
                  columns: int, prepacked: bool = False) -> list[te.Tensor]:
    """``acc`` (N, groups, K-vectors, OH, OW, 16) from ``packed`` activations (N, groups,
    C-groups, rows, cols, group), broadcast, and ``wpack`` weights (groups, K-vectors, C-groups,
    kh, kw, 16, group). With ``prepacked`` the weight input is already ``wpack``."""
    q = kind.group
    oh, ow = s.out
    cb, owp = -(-s.cg // q), round_up(ow, columns)
    data, weight, extra = _conv_inputs(s, dtype, epilogue, kind, "channels", LANES, prepacked)

    def pack(b, g, block, y, x, t):
        return _shifted(s, data, kind, offset, b, g, block * q + t, y, x)

    def wpack(g, kblock, block, i, j, lane, t):
        return _weight_entry(s, weight, kind, g, kblock * LANES + lane, block * q + t, i, j)

    packed = te.compute((s.n, s.groups, cb, *s.rows_cols(owp), q), pack, "packed")
    wpacked = weight if prepacked else te.compute(
        weight_layout(s, kind, "channels", LANES)[0], wpack, "wpack")
    rb, ri, rj, rt = axes(("rb", cb), ("ri", s.kh), ("rj", s.kw), ("rt", q))
    acc = te.compute((s.n, s.groups, wpacked.shape[1], oh, owp, LANES),
                     lambda b, g, kblock, y, x, lane: te.sum(
        packed[b, g, rb, *s.tap(y, x, ri, rj), rt].astype("int32")
        * wpacked[g, kblock, rb, ri, rj, lane, rt].astype("int32"), axis=[rb, ri, rj, rt]), "acc")

    def weight_at(o, cin, i, j):
        kin = o % s.kg
        return wpacked[o // s.kg, kin // LANES, cin // q, i, j, kin % LANES, cin % q]

    return _conv_value(s, weight_at if prepacked else _unpacked(weight), offset, epilogue,
                       [data, weight, *extra], _group_index(s, lambda b, g, o, y, x: acc[
                           b, g, o // LANES, y, x, o % LANES]))


def weight_layout(s: ConvShape, kind: DotKind, form: str, channels: int
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shape of a VNNI layout's ``wpack``, and the axes of the zero-padded weight
    ``(groups, Kg, C-groups, group, kh, kw)`` (a view of (K, C / groups, kh, kw)) it transposes
    (``columns``), or of ``(groups, K-vectors, 16, C-groups, group, kh, kw)`` (``channels``)."""
    cb = -(-s.cg // kind.group)
    if form == "columns":
        return ((s.groups, round_up(s.kg, channels), cb, s.kh, s.kw, kind.group),
                (0, 1, 2, 4, 5, 3))
    return ((s.groups, -(-s.kg // LANES), cb, s.kh, s.kw, LANES, kind.group),
            (0, 1, 3, 5, 6, 2, 4))


def dense_lanes(n: int, c: int, k: int, dtype: str, kind: DotKind | None, offset: int,
                epilogue: Epilogue) -> list[te.Tensor]:
    """Per row, 16 partial sums over chunks of ``16 * group`` features (one VNNI product or
    int32 multiply-add per chunk), their sum, and the leftover features."""
    q = kind.group if kind is not None else 1
    chunk = LANES * q
    main = c // chunk * chunk
    data = te.placeholder((n, c), "int32", "data")
    weight = te.placeholder((k, c), dtype, "weight")
    extra = epilogue.placeholders(k)
    terms = []
    if main:
        source = data
        if kind is not None:
            source = te.compute((n, main), lambda b, i: (
                data[b, i] + offset if offset else data[b, i]).astype(kind.data), "cast")
        rb, rt = axes(("rb", main // chunk), ("rt", q))
        part = te.compute((n, k, LANES), lambda b, o, lane: te.sum(
            source[b, rb * chunk + lane * q + rt].astype("int32")
            * weight[o, rb * chunk + lane * q + rt].astype("int32"), axis=[rb, rt]), "part")
        (rl,) = axes(("rl", LANES))
        hsum = te.compute((n, k), lambda b, o: te.sum(part[b, o, rl], axis=rl), "hsum")
        terms.append(lambda b, o: hsum[b, o])
        if offset:
            wsum = weight_sums(weight, k, (main,))
            terms.append(lambda b, o: wsum[o] * -offset)
    if c > main:
        (rr,) = axes(("rr", c - main))
        tail = te.compute((n, k), lambda b, o: te.sum(
            data[b, main + rr] * weight[o, main + rr].astype("int32"), axis=rr), "tail")
        terms.append(lambda b, o: tail[b, o])
    value = te.compute((n, k), lambda b, o: _total(term(b, o) for term in terms), "value")
    return [data, weight, *extra, apply_epilogue(value, epilogue, extra)]


def dense_simple(n: int, c: int, k: int, dtype: str, epilogue: Epilogue) -> list[te.Tensor]:
    data = te.placeholder((n, c), "int32", "data")
    weight = te.placeholder((k, c), dtype, "weight")
    extra = epilogue.placeholders(k)
    (rc,) = axes(("rc", c))
    acc = te.compute((n, k), lambda b, o: te.sum(
        data[b, rc] * weight[o, rc].astype("int32"), axis=rc), "acc")
    return [data, weight, *extra, apply_epilogue(acc, epilogue, extra)]


def weight_sums(weight: te.Tensor, k: int, extents: tuple[int, ...]) -> te.Tensor:
    """``wsum[o]``: the sum of ``weight[o, ...]`` over the leading ``extents`` (int32)."""
    reduce = axes(*((f"rs{i}", extent) for i, extent in enumerate(extents)))
    return te.compute((k,), lambda o: te.sum(weight[(o, *reduce)].astype("int32"), axis=reduce),
                      "wsum")


def _conv_inputs(s: ConvShape, dtype: str, epilogue: Epilogue, kind: DotKind | None = None,
                 form: str = "plain", channels: int = 1, prepacked: bool = False):
    data = te.placeholder((s.n, s.c, s.h, s.w), "int32", "data")
    if prepacked:
        weight = te.placeholder(weight_layout(s, kind, form, channels)[0], kind.weight, "weight")
    else:
        weight = te.placeholder((s.k, s.cg, s.kh, s.kw), dtype, "weight")
    return data, weight, epilogue.placeholders(s.k)


def _shifted(s: ConvShape, data, kind: DotKind, offset: int, b, g, cin, y, x):
    """Input channel ``cin`` of group ``g`` at padded ``(y, x)`` plus ``offset``, as
    ``kind.data``; channels past the group's hold the offset too (their weights are 0)."""
    value = s.padded(lambda row, col: data[b, g * s.cg + T.min(cin, s.cg - 1), row, col], y, x)
    value = T.if_then_else(cin < s.cg, value, T.const(0, "int32"))
    return (value + offset if offset else value).astype(kind.data)


def _weight_entry(s: ConvShape, weight, kind: DotKind, g, o, cin, i, j):
    """Weight of output ``o`` and input ``cin`` within group ``g``, 0 past either's count."""
    value = weight[g * s.kg + T.min(o, s.kg - 1), T.min(cin, s.cg - 1), i, j]
    return T.if_then_else(T.all(o < s.kg, cin < s.cg), value.astype(kind.weight),
                          T.const(0, kind.weight))


def _unpacked(weight: te.Tensor):
    return lambda o, cin, i, j: weight[o, cin, i, j]


def _group_index(s: ConvShape, acc):
    """``acc(b, g, o, y, x)`` (``o`` within group ``g``) as a function of output channel."""
    if s.groups == 1:
        return lambda b, o, y, x: acc(b, 0, o, y, x)
    return lambda b, o, y, x: acc(b, o // s.kg, o % s.kg, y, x)


def _conv_value(s: ConvShape, weight_at, offset: int, epilogue: Epilogue, inputs, acc):
    """The NCHW accumulator ``acc(b, o, y, x) - offset * sum weight_at(o, ...)``, and the
    epilogue; ``inputs`` are the kernel's inputs (data, weight, epilogue inputs)."""
    wsum = None
    if offset:
        reduce = axes(("rs0", s.cg), ("rs1", s.kh), ("rs2", s.kw))
        wsum = te.compute((s.k,), lambda o: te.sum(weight_at(o, *reduce).astype("int32"),
                                                  axis=reduce), "wsum")

    def value(b, o, y, x):
        return acc(b, o, y, x) - wsum[o] * offset if offset else acc(b, o, y, x)

    value = te.compute((s.n, s.k, *s.out), value, "value")
    return [*inputs, apply_epilogue(value, epilogue, inputs[2:])]


def axes(*extents):
    return [te.reduce_axis((0, extent), name) for name, extent in extents]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _clamp(index, size: int):
    return T.max(T.min(index, size - 1), 0)


def _total(terms):
    total = None
    for term in terms:
        total = term if total is None else total + term
    return total
