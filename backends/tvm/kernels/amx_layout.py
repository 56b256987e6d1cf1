"""Where AMX convs find their operands: the activation :class:`Layout`, a conv's tile
:class:`Conv` geometry over it, and the interleaved weight order (:func:`pack_weight`).

Activations go between AMX convs channels last, each image zero-padded by ``pad`` pixels on every
side and flattened to rows of ``Cp`` bytes (``C`` rounded up to 64), ``(H + 2 pad) (W + 2 pad)``
rows plus a tail that tile loads may run into:

    layout[n, (y + pad) Wp + x + pad, c] = codes[n, c, y, x],   Wp = W + 2 pad

and zero on the border. Channels ``C..Cp-1`` and the tail hold anything: the weights of padded
channels are zero, and a tail row only reaches outputs that are dropped.

A conv (kernel ``kh x kw``, stride ``s`` both ways, padding ``ph, pw <= pad``) is an implicit
GEMM over those rows. Output pixels come in tiles of 16 whose input rows are ``s`` apart, so one
tile load (a stride of ``s Cp`` bytes) reads a tap's 64 channels for all 16:

- stride 1: the 16 are consecutive in a virtual output of width ``Wp`` (``p = oy Wp + ox``
  reads row ``base + p + i Wp + j``); the ``Wp - Wo`` columns past each row's end are computed
  and dropped;
- stride > 1: the 16 are consecutive in one output row, ``ceil(Wo / 16)`` tiles a row.

Weights are in AMX's 4-byte-interleaved order (a 64 x 16 tile of input by output channels is
16 rows of 64 bytes, ``row = c / 4``, ``byte = 4 k + c % 4``), each tile 1 KB in a row and the
tiles in the order a task loads them (:func:`pack_weight`).
"""

from dataclasses import dataclass

import numpy as np

TILE_ROWS = 16
TILE_BYTES = 64
BLOCK = 32
"""Output pixels and output channels per task (two tiles each way)."""


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


@dataclass(frozen=True)
class Layout:
    """Codes of an (N, C, H, W) tensor as AMX convs read them (module docstring)."""

    batch: int
    channels: int
    height: int
    width: int
    pad: int
    rows: int
    """Rows per image, at least ``(H + 2 pad) (W + 2 pad)``."""

    @property
    def padded_channels(self) -> int:
        return _round_up(self.channels, TILE_BYTES)

    @property
    def padded_width(self) -> int:
        return self.width + 2 * self.pad

    @property
    def image_rows(self) -> int:
        return (self.height + 2 * self.pad) * self.padded_width

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.batch, self.rows, self.padded_channels)

    @property
    def tag(self) -> str:
        return (f"n{self.batch}c{self.channels}h{self.height}w{self.width}p{self.pad}"
                f"r{self.rows}")

    def to_layout(self, codes: np.ndarray) -> np.ndarray:
        """``codes`` (N, C, H, W), values 0..255, in this layout (zero border, tail, pad)."""
        out = np.zeros(self.shape, np.uint8)
        p, wp = self.pad, self.padded_width
        image = out[:, :self.image_rows].reshape(self.batch, -1, wp, self.padded_channels)
        image[:, p:p + self.height, p:p + self.width, :self.channels] = \
            np.asarray(codes).transpose(0, 2, 3, 1)
        return out

    def from_layout(self, stored: np.ndarray) -> np.ndarray:
        """The (N, C, H, W) codes a layout array holds."""
        p, wp = self.pad, self.padded_width
        image = stored[:, :self.image_rows].reshape(self.batch, -1, wp, self.padded_channels)
        return np.ascontiguousarray(
            image[:, p:p + self.height, p:p + self.width, :self.channels].transpose(0, 3, 1, 2))


@dataclass(frozen=True)
class Conv:
    """A conv over a :class:`Layout`: which output pixel each tile row computes, and where
    each tile's input rows start."""

    source: Layout
    out_channels: int
    kernel: tuple[int, int]
    stride: int
    padding: tuple[int, int]

    def __post_init__(self):
        if max(self.padding) > self.source.pad:
            raise ValueError(f"padding {self.padding} exceeds the layout's {self.source.pad}")

    @property
    def out_size(self) -> tuple[int, int]:
        (kh, kw), (ph, pw), s = self.kernel, self.padding, self.stride
        return ((self.source.height + 2 * ph - kh) // s + 1,
                (self.source.width + 2 * pw - kw) // s + 1)

    @property
    def flat(self) -> bool:
        return self.stride == 1

    @property
    def tiles_per_row(self) -> int:
        return -(-self.out_size[1] // TILE_ROWS)

    @property
    def tiles(self) -> int:
        """16-pixel tiles per image, rounded up to an even count (a task takes two)."""
        ho, _ = self.out_size
        count = (-(-ho * self.source.padded_width // TILE_ROWS) if self.flat
                 else ho * self.tiles_per_row)
        return _round_up(count, 2)

    @property
    def padded_out_channels(self) -> int:
        return _round_up(self.out_channels, BLOCK)

    @property
    def base(self) -> int:
        """The layout row of output pixel (0, 0)'s first tap."""
        (ph, pw), p = self.padding, self.source.pad
        return (p - ph) * self.source.padded_width + (p - pw)

    def start(self, tile):
        """The layout row of ``tile``'s first pixel at tap (0, 0)."""
        if self.flat:
            return self.base + tile * TILE_ROWS
        per_row = self.tiles_per_row
        oy, ox = tile // per_row, tile % per_row * TILE_ROWS
        return self.base + oy * self.stride * self.source.padded_width + ox * self.stride

    def pixel(self, tile, row):
        """``(oy, ox)`` of row ``row`` of ``tile``; valid while ``oy < Ho`` and ``ox < Wo``."""
        if self.flat:
            position = tile * TILE_ROWS + row
            wp = self.source.padded_width
            return position // wp, position % wp
        per_row = self.tiles_per_row
        return tile // per_row, tile % per_row * TILE_ROWS + row

    @property
    def rows_read(self) -> int:
        """Rows per image the tile loads reach, the last tile included."""
        kh, kw = self.kernel
        last = self.start(self.tiles - 1)
        return last + (TILE_ROWS - 1) * self.stride + (kh - 1) * self.source.padded_width \
            + kw - 1 + 1

    @property
    def tag(self) -> str:
        (kh, kw), (ph, pw) = self.kernel, self.padding
        return (f"{self.source.tag}_k{self.out_channels}x{kh}x{kw}s{self.stride}"
                f"p{ph}x{pw}")


def shared_layout(batch: int, channels: int, height: int, width: int, convs: list) -> Layout:
    """The layout convs read one (N, C, H, W) tensor in: padded for the widest of them, rows
    for the longest reach. ``convs`` are :class:`Conv` arguments after the source:
    ``(out_channels, kernel, stride, padding)``."""
    pad = max(max(padding) for *_, padding in convs)
    probe = Layout(batch, channels, height, width, pad, 0)
    rows = max([probe.image_rows, *(Conv(probe, *conv).rows_read for conv in convs)])
    return Layout(batch, channels, height, width, pad, rows)


def weight_shape(kernel: tuple[int, int], padded_channels: int, padded_out_channels: int
                 ) -> tuple[int, ...]:
    """The shape of :func:`pack_weight`'s array: (Kp / 32, kh kw, Cp / 64, 2, 16, 64)."""
    kh, kw = kernel
    return (padded_out_channels // BLOCK, kh * kw, padded_channels // TILE_BYTES, 2, TILE_ROWS,
            TILE_BYTES)


def pack_weight(weight: np.ndarray, padded_channels: int, padded_out_channels: int
                ) -> np.ndarray:
    """``weight`` int8 (K, C, kh, kw) as the kernel reads it, zero in the padded channels; ``Cp``,
    ``Kp`` as :class:`Conv` pads them. Every tile the kernel loads is 1 KB in a row, in the order
    one task loads them: ``[K / 32, tap, C / 64, half, c / 4, 4 (k % 16) + c % 4]`` (module
    docstring)."""
    k, c, kh, kw = weight.shape
    cp, kp = padded_channels, padded_out_channels
    padded = np.zeros((kp, cp, kh, kw), np.int8)
    padded[:k, :c] = weight
    # (block, half, k16, step, row, c4, tap) -> (block, tap, step, half, row, k16, c4)
    split = padded.reshape(kp // BLOCK, 2, TILE_ROWS, cp // TILE_BYTES, TILE_ROWS, 4, kh * kw)
    ordered = split.transpose(0, 6, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(ordered).reshape(weight_shape((kh, kw), cp, kp))
