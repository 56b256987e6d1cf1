"""The integer IR: what ``integerize`` produces and every backend compiles.

An :class:`IntegerGraph` is a straight list of operations in execution order, each a small frozen
dataclass naming the values it reads and the value it writes (values are named after the fx
nodes they come from). A straight list of plain dataclasses, not an fx graph, because a backend
lowers op by op and needs each op's integer parameters at hand, not Python callables.

Values are of three kinds:

- **codes** (:class:`CodeFormat`): unsigned integers ``u`` in ``[0, len(levels))``, the index of
  a quantizer's code. ``u`` stands for the integer ``levels[u]`` and the float
  ``levels[u] * scale``. Uniform quantizers have ``levels = m * (codes - zero_point)`` with
  ``m = 2`` only when the zero point is a half integer (levels ``-3, -1, 1, 3``: the bipolar
  form), so every code is an integer and float 0 is the integer 0 (zero padding stays exact).
- **accumulators** (:class:`Accumulator`): signed integers ``V`` (int32 range, proven by a static
  bound) with a float meaning ``V * scale[c] + bias[c]`` per channel ``c`` (dimension 1).
- **float**: the graph's input and output.

Operations: :class:`Quantize` (float input to codes), :class:`Conv` / :class:`Linear` (codes times
packed weights, int32 accumulation), :class:`Add` and :class:`SumPool` (integer sums of codes'
levels), :class:`Concat`, :class:`MaxPool` and :class:`Reshape` (on codes),
:class:`Requantize` (an accumulator, or codes, to the codes of the next quantizer by a monotone
per-channel staircase of integer thresholds, or an equivalent fixed-point multiply and shift),
and :class:`Dequantize` (an accumulator to float logits).
"""

from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch

from qcompile.packing import WORD_BITS, packed_bytes, unpack_bits
from qcompile.requantization import FixedPoint

INT32_MAX = 2**31 - 1


@dataclass(frozen=True, eq=False)
class CodeFormat:
    """Codes of ``bits`` bits: ``u`` stands for ``levels[u]``, the float ``levels[u] * scale``."""

    bits: int
    levels: torch.Tensor
    scale: float
    quantizer: str

    @property
    def peak(self) -> int:
        """The largest magnitude of a level."""
        return int(self.levels.abs().max())


@dataclass(frozen=True, eq=False)
class Accumulator:
    """An integer ``V`` meaning ``V * scale[c] + bias[c]`` (per channel, or one entry);
    ``|V| <= bound``."""

    scale: torch.Tensor
    bias: torch.Tensor
    bound: int


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A weight of ``shape`` (C_out, C_in / groups, *kernel) as packed codes.

    ``words`` is ``pack_bits(u, bits, axis=1)`` (see :mod:`qcompile.packing`): bit-planes of the
    code indices ``u`` packed along the input channels. ``u`` stands for the integer
    ``levels[c, u]`` of output channel ``c`` and the float ``levels[c, u] * scale[c]``.
    """

    bits: int
    shape: tuple[int, ...]
    words: np.ndarray
    levels: torch.Tensor
    scale: torch.Tensor

    @cached_property
    def integers(self) -> torch.Tensor:
        """The integer weight (int64, ``shape``) the packed codes stand for."""
        codes = torch.from_numpy(unpack_bits(self.words, self.bits, self.shape[1], axis=1))
        rows = torch.gather(self.levels, 1, codes.reshape(self.shape[0], -1))
        return rows.reshape(self.shape)

    @property
    def packed_bytes(self) -> int:
        return packed_bytes(self.shape, self.bits, axis=1)

    @property
    def affine(self) -> tuple[int, int] | None:
        """``(alpha, beta)`` with every level ``alpha * u - beta`` (``alpha`` 1 or 2, one pair
        for all channels), or None: the form a bit-serial kernel computes with."""
        u = torch.arange(self.levels.shape[1], dtype=self.levels.dtype)
        for alpha in (1, 2):
            beta = alpha * u[0] - self.levels[0, 0]
            if bool((self.levels == alpha * u - beta).all()):
                return alpha, int(beta)
        return None

    @property
    def form(self) -> str:
        """How the levels relate to the codes, for kernels: ``signed`` (two's complement
        ``u - 2**(bits-1)``), ``unsigned`` (``u``), ``bipolar`` (``2u - (2**bits - 1)``), or
        ``table`` (anything else, e.g. learned levels)."""
        u = torch.arange(self.levels.shape[1])
        count = 2**self.bits
        forms = {"signed": u - count // 2, "unsigned": u, "bipolar": 2 * u - (count - 1)}
        for name, levels in forms.items():
            if self.levels.shape[1] == count and bool((self.levels == levels).all()):
                return name
        return "table"


@dataclass(frozen=True, eq=False)
class Quantize:
    """Float input to codes: clamp to ``[low, high]``, then the quantizer's integer meaning."""

    name: str
    input: str
    spec: object
    low: float = -float("inf")
    high: float = float("inf")


@dataclass(frozen=True, eq=False)
class Conv:
    """N-d convolution of codes' levels with a packed weight, zero padding, int32 accumulation."""

    name: str
    input: str
    weight: PackedWeight
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    layer: str


@dataclass(frozen=True, eq=False)
class Linear:
    """Codes' levels (N, C_in) times a packed (C_out, C_in) weight, int32 accumulation."""

    name: str
    input: str
    weight: PackedWeight
    layer: str


@dataclass(frozen=True, eq=False)
class Add:
    """The sum of the levels of codes of one format (a residual join)."""

    name: str
    inputs: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Concat:
    """Codes of one format concatenated along ``dim``."""

    name: str
    inputs: tuple[str, ...]
    dim: int


@dataclass(frozen=True, eq=False)
class SumPool:
    """Window sums of codes' levels (average pooling with its divisor moved into the scale).

    ``kernel``/``stride``/``padding`` for fixed windows, or ``output_size`` for adaptive ones;
    every window holds ``divisor`` elements (zero padding counted)."""

    name: str
    input: str
    divisor: int
    kernel: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    padding: tuple[int, ...] | None = None
    output_size: tuple[int, ...] | None = None


@dataclass(frozen=True, eq=False)
class MaxPool:
    """Max pooling of codes (codes are ordered as their values)."""

    name: str
    input: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    ceil_mode: bool


@dataclass(frozen=True, eq=False)
class Reshape:
    """Codes flattened from ``start_dim`` to ``end_dim`` (``torch.flatten``)."""

    name: str
    input: str
    start_dim: int
    end_dim: int


@dataclass(frozen=True, eq=False)
class Requantize:
    """An integer ``V`` (an accumulator, or the levels of codes) to the codes of a quantizer.

    Per channel ``c`` (dimension 1; one row for all channels when ``thresholds`` has one row):
    ``u = #{k : direction[c] * V >= thresholds[c, k]}``, thresholds non-decreasing. Where the
    staircase is uniform enough, ``fixed_point`` (:class:`~qcompile.requantization.FixedPoint`)
    gives the same ``u`` by a multiply, add and shift on every ``|V| <= bound``.
    """

    name: str
    input: str
    thresholds: torch.Tensor
    direction: torch.Tensor
    fixed_point: FixedPoint | None = None


@dataclass(frozen=True, eq=False)
class Dequantize:
    """An accumulator (or codes) to float: ``V * scale + bias`` in float64, clamped to
    ``[low, high]`` (a ReLU after the last layer), returned as float32."""

    name: str
    input: str
    low: float = -float("inf")
    high: float = float("inf")


Op = Quantize | Conv | Linear | Add | Concat | SumPool | MaxPool | Reshape | Requantize | Dequantize


class SizeRow(NamedTuple):
    """One layer of :meth:`IntegerGraph.size_rows`: its weight bits, the weight's bytes at those
    bits (``ceil(bits * count / 8)``), the bytes of the bit planes the program holds
    (:attr:`PackedWeight.packed_bytes`, input channels padded to whole words) and as float32."""

    layer: str
    bits: int
    at_bits: int
    planes: int
    fp32: int


@dataclass
class IntegerGraph:
    """Operations in execution order, the formats of their values, the graph's input and output.

    Calling it runs the reference backend (:mod:`qcompile.backends.reference`).
    """

    ops: list[Op]
    inputs: list[str]
    output: str
    values: dict[str, CodeFormat | Accumulator | None] = field(default_factory=dict)
    input_shapes: list[tuple[int, ...] | None] = field(default_factory=list)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        from qcompile.backends.reference import run

        return run(self, *inputs)[self.output]

    def integer_activations(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every value the graph computes on ``inputs``, by name (codes, accumulators, output)."""
        from qcompile.backends.reference import run

        return run(self, *inputs)

    def layers(self) -> list[Conv | Linear]:
        return [op for op in self.ops if isinstance(op, (Conv, Linear))]

    def size_rows(self) -> list[SizeRow]:
        """Per layer: :class:`SizeRow` (weight bits, bytes at those bits, bytes of this program's
        bit planes, float32 bytes)."""
        rows = []
        for op in self.layers():
            count = int(np.prod(op.weight.shape))
            rows.append(SizeRow(op.layer, op.weight.bits, -(-op.weight.bits * count // 8),
                                op.weight.packed_bytes, 4 * count))
        return rows

    def size_report(self) -> str:
        """Weight bytes at the assigned bits against float32 bytes, per layer and in total, with
        the bytes of the bit planes this program holds them in."""
        rows = self.size_rows()
        lines = [f"{'layer':32} {'bits':>4} {'at bits B':>10} {'fp32 B':>10} {'ratio':>7} "
                 f"{'planes B':>10}"]
        for row in rows:
            lines.append(f"{row.layer:32} {row.bits:4d} {row.at_bits:10d} {row.fp32:10d} "
                         f"{row.fp32 / max(row.at_bits, 1):7.1f}x {row.planes:10d}")
        at_bits, full, planes = (sum(getattr(r, name) for r in rows)
                                 for name in ("at_bits", "fp32", "planes"))
        lines.append(f"{'total':32} {'':4} {at_bits:10d} {full:10d} "
                     f"{full / max(at_bits, 1):7.1f}x {planes:10d}")
        lines.append("planes B: the weights as this program holds them, one bit plane per bit "
                     f"with input channels {WORD_BITS} to a word")
        return "\n".join(lines)
