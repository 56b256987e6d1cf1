"""What every quantizer shares: the straight-through rounding, the integer meaning, the base class.

A quantizer is a small ``nn.Module``. Its forward is the *simulated* value: a float tensor that
takes at most ``2**bits`` distinct values per channel, differentiable through a straight-through
or smooth estimator. Its :meth:`Quantizer.integer_spec` states the *integer meaning* of that
forward: which integer codes it emits and how a float maps to them, which is what the integer
lowering and the backends compile.

The contract a quantizer keeps, checked by the property tests for every method and bit-width:
in hard mode, ``q(x) == spec.dequantize(spec.quantize(x))`` exactly, element for element, where
``spec = q.integer_spec()``. To make that hold bit for bit, a quantizer's hard forward computes the
same float expressions as :class:`IntegerSpec` (``x / scale``, round half to even, clamp, then
``(code - zero_point) * scale``), or is itself written as a threshold lookup.
"""

from dataclasses import dataclass

import torch
from torch import nn

from qcompile.errors import ConfigError


class RoundSTE(torch.autograd.Function):
    """Round to nearest (half to even) forward; pass the gradient through unchanged backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.round`` with a straight-through gradient (the estimator every method shares)."""
    return RoundSTE.apply(x)


def step_mask(x: torch.Tensor, at_zero: float) -> torch.Tensor:
    """``1.0`` where ``x > 0``, ``0.0`` where ``x < 0`` and ``at_zero`` (0 or 1) at zero: a
    comparison as float arithmetic, for gradient masks of compiled backward passes.

    Left to itself, torch.compile's partitioner moves a backward pass's comparisons of a saved
    input into the forward pass and saves their ``bool`` results, the smallest tensors to keep, and
    inductor's CPU code writes and reads ``bool`` tensors element by element (a mask over
    64x16x28x28: 3.3 ms against 0.13 for the same values as float). A quantizer whose gradient
    needs nothing but masks, such as DoReFa's fixed clip or PACT's, ran 5-13 times slower than one
    that keeps its input anyway (a compiled 4-bit activation quantizer on that tensor, forward and
    backward: PACT 6-11 ms, DoReFa 4-7, LSQ 0.5-0.9). A mask computed from ``torch.sign`` leaves
    nothing smaller than the input to save, and compiles to vector code (``torch.heaviside``, the
    obvious spelling, compiles to a scalar NaN test per element and took 1.7 ms). In eager mode,
    where each of its operations is a pass over the tensor, a ``bool`` mask is the faster form
    (PACT's quantizer as above: 4-5 ms with ``torch.where`` on masks, 9-10 with these), and
    :class:`ClampThrough` and PACT's clip use masks there.
    """
    if at_zero == 1.0:
        return 1 - torch.relu(-torch.sign(x))
    return torch.relu(torch.sign(x))


class ClampThrough(torch.autograd.Function):
    """``clamp(x, low, high)`` with the gradient ``torch.clamp`` has (passed where ``low < x <
    high``, zero elsewhere, on the bounds too), its mask made of :func:`step_mask` so that a
    compiled graph saves ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.bounds = (low, high)
        return torch.clamp(x, low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        low, high = ctx.bounds
        inside = step_mask(x - low, 0.0) * step_mask(high - x, 0.0)
        return grad * inside, None, None


def clamp_through(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``torch.clamp(x, low, high)`` for numbers ``low <= high``, gradient and all: torch's own in
    eager mode, :class:`ClampThrough` under ``torch.compile``."""
    if not torch.compiler.is_compiling():
        return torch.clamp(x, low, high)
    return ClampThrough.apply(x, low, high)


class ReplaceGradient(torch.autograd.Function):
    """Forward returns ``value`` exactly; backward sends the gradient to ``surrogate`` instead.

    ``x + (value - x).detach()`` is the usual trick, but it is not exact in floating point; this
    keeps the forward bit-exact with the integer meaning while training through ``surrogate``.
    """

    @staticmethod
    def forward(ctx, value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


def replace_gradient(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    return ReplaceGradient.apply(value, surrogate)


def threshold_index(x: torch.Tensor, thresholds: torch.Tensor, axis: int | None,
                    dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """How many of the non-decreasing ``thresholds`` each element of ``x`` reaches (``x >= t``),
    as ``dtype`` (int64 or int32).

    ``thresholds`` is 1-D (per tensor) or (C, n), one row per channel along ``axis`` of ``x``.
    Eager: ``torch.searchsorted``, a binary search, so an 8-bit staircase costs no 255-fold
    temporary. Under ``torch.compile`` the same count is written in elementwise operations that
    inductor fuses with the code around it (its CPU backend runs a search as an opaque call over
    the whole tensor): see :func:`_fused_index`.
    """
    common = torch.promote_types(x.dtype, thresholds.dtype)
    x, thresholds = x.to(common), thresholds.to(device=x.device, dtype=common)
    if torch.compiler.is_compiling():
        return _fused_index(x, thresholds, axis).to(dtype)
    narrow = dtype == torch.int32
    if thresholds.dim() == 1 or thresholds.shape[0] == 1:
        return torch.searchsorted(thresholds.reshape(-1), x.contiguous(), right=True,
                                  out_int32=narrow)
    rows = x.movedim(axis, 0).reshape(thresholds.shape[0], -1)
    index = torch.searchsorted(thresholds.contiguous(), rows.contiguous(), right=True,
                               out_int32=narrow)
    return index.reshape(x.movedim(axis, 0).shape).movedim(0, axis)


UNROLLED_THRESHOLDS = 32
"""Below this many thresholds :func:`_fused_index` compares with each, from it on it searches."""


def _fused_index(x: torch.Tensor, thresholds: torch.Tensor, axis: int | None) -> torch.Tensor:
    """:func:`threshold_index` as elementwise operations: the count of thresholds ``t`` with
    ``not x < t`` (so NaN reaches all of them, as it does in ``searchsorted``), by one compare per
    threshold when they are few, else by a branchless binary search over the row padded with
    ``inf`` to ``2**m - 1`` entries (``m`` steps, each a compare with one looked-up threshold).

    Few thresholds are counted in int32, and returned so (inductor vectorizes int64 arithmetic
    poorly on the CPU: QN's compiled window code took 45-51 ms on int64 counts, 5 on int32 ones,
    and 4.3 against 3.9 ms on int32 counts that went through int64 on the way).

    The rows are sorted first, which leaves non-decreasing rows as they are (up to the order of
    ``-0.0`` and ``0.0``, which compare equal) but makes inductor compute the table once: left as
    an expression of the quantizer's parameters it would be inlined, and recomputed (``pow`` and
    all) for every element it is compared with.
    """
    count = thresholds.shape[-1]
    table = thresholds.reshape(-1, count).sort(dim=-1).values
    channels = table.shape[0]
    shape = [1] * x.dim()
    if channels > 1:
        shape[axis % x.dim()] = channels
    if count < UNROLLED_THRESHOLDS:
        index = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
        for k in range(count):
            index = index + (~(x < table[:, k].reshape(shape))).to(torch.int32)
        return index
    steps = count.bit_length()
    width = 2**steps - 1
    padded = torch.cat([table, table.new_full((channels, width - count), float("inf"))], dim=1)
    offset = (torch.arange(channels, device=x.device) * width).reshape(shape)
    flat = padded.reshape(-1)
    index = torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    for step in reversed(range(steps)):
        probe = index + 2**step
        index = torch.where(~(x < flat[offset + probe - 1]), probe, index)
    return index.clamp_max(count)


@dataclass(frozen=True, eq=False)
class IntegerSpec:
    """The integer meaning of a quantizer in hard mode.

    ``codes`` are the integer levels emitted (1-D, ascending, at most ``2**bits``). A float ``x``
    maps to a code either by the affine rule ``clamp(round(x / scale) + zero_point)`` (when
    ``thresholds`` is None; ``codes`` must then be a contiguous range) or by thresholds:
    ``codes[k]`` where ``k`` counts the thresholds ``t`` with ``x >= t`` (``thresholds`` holds
    ``len(codes) - 1`` non-decreasing values, per channel when 2-D). A code's float value is
    ``(code - zero_point) * scale``, unless ``values`` lists a (non-uniform) value per code;
    ``levels`` then gives the integer each code stands for, ``values == levels * scale`` (an
    integer layer multiplies those integers and scales the sum once).
    ``scale``, ``zero_point``, ``thresholds`` and ``values`` are per channel along ``axis`` of the
    quantized tensor when their first dimension is the channel count, else per tensor.
    """

    bits: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    axis: int | None = None
    thresholds: torch.Tensor | None = None
    values: torch.Tensor | None = None
    levels: torch.Tensor | None = None

    def __post_init__(self):
        if self.thresholds is not None and not torch.compiler.is_compiling():
            if self.thresholds.shape[-1] != len(self.codes) - 1:
                raise ValueError("IntegerSpec needs len(codes) - 1 thresholds per channel")
            if bool((self.thresholds[..., 1:] < self.thresholds[..., :-1]).any()):
                raise ValueError("IntegerSpec thresholds must be non-decreasing")

    @property
    def signed(self) -> bool:
        return bool(self.codes.min() < 0)

    @property
    def qmin(self) -> int:
        return int(self.codes.min())

    @property
    def qmax(self) -> int:
        return int(self.codes.max())

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The integer code of every element of ``x`` (int64)."""
        x = x.detach()
        if self.thresholds is None:
            scale = self._along_axis(self.scale, x)
            zero_point = self._along_axis(self.zero_point, x)
            q = torch.round(x / scale) + zero_point
            return torch.clamp(q, self.qmin, self.qmax).to(torch.int64)
        index = threshold_index(x, self.thresholds, self.axis)
        return self.codes.to(device=x.device, dtype=torch.int64)[index]

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """The float value of every integer code in ``q``."""
        if self.values is None:
            scale = self._along_axis(self.scale, q)
            zero_point = self._along_axis(self.zero_point, q)
            return (q.to(scale.dtype) - zero_point) * scale
        index = torch.searchsorted(self.codes.to(q.device), q.contiguous())
        if self.values.dim() == 1 or self.values.shape[0] == 1:
            return self.values.reshape(-1)[index]
        table = self._channels_last(self.values, q)
        table = table.expand(*q.shape, table.shape[-1])
        return torch.gather(table, -1, index.unsqueeze(-1))[..., 0]

    def _along_axis(self, param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if param.dim() == 0 or param.numel() == 1 or self.axis is None:
            return param.reshape(()) if param.numel() == 1 else param
        shape = [1] * x.dim()
        shape[self.axis % x.dim()] = -1
        return param.reshape(shape)

    def _channels_last(self, table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Reshape a (C, n) table so it broadcasts against ``x.unsqueeze(-1)`` along ``axis``."""
        shape = [1] * (x.dim() + 1)
        shape[self.axis % x.dim()] = table.shape[0]
        shape[-1] = table.shape[1]
        return table.reshape(shape)


class Quantizer(nn.Module):
    """Base of every quantizer: its settings, an on/off switch, and the two faces of its meaning.

    ``bits`` 1-8; ``signed`` for weights (and signed activations where a method allows);
    ``per_channel`` with ``channels`` learnable parameters along ``channel_axis`` of the input.
    Subclasses implement :meth:`fake_quantize` (the simulated forward), :meth:`integer_spec` and
    :meth:`initialize` (set the parameters from a float tensor: the weight, or calibration
    activations). ``enabled = False`` makes the quantizer the identity (stochastic precision).

    Two small protocols the property tests and the integer lowering rely on:

    - ``hard`` / :meth:`set_hard`: a method with a smooth training forward (a temperature, a soft
      staircase) honours ``self.hard`` in :meth:`fake_quantize` and is exactly described by
      :meth:`integer_spec` only when it is True; a method without a soft mode ignores it (its
      forward is always hard).
    - ``projection``: True when the hard forward's levels lie in the input's own domain, so the
      quantizer is a projection and ``q(q(x)) == q(x)``. A method that first maps the input
      through a transform with another range (DoReFa's ``tanh`` weight normalization, QIL's
      transformer) sets it False; re-quantizing its output is then only required to stay exactly
      described by its integer meaning.
    """

    method: str = ""
    projection: bool = True

    def __init__(
        self,
        bits: int,
        *,
        signed: bool,
        per_channel: bool = False,
        channels: int = 1,
        channel_axis: int = 0,
    ):
        super().__init__()
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ConfigError(f"{type(self).__name__}: bits must be an integer 1-8, got {bits!r}")
        if per_channel and channels < 1:
            raise ConfigError(f"{type(self).__name__}: per_channel needs channels >= 1")
        self.bits = bits
        self.signed = signed
        self.per_channel = per_channel
        self.channels = channels if per_channel else 1
        self.channel_axis = channel_axis
        self.enabled = True
        self.hard = False
        # ``enabled`` as a tensor, for compiled training steps that switch quantizers per step
        # (set by the training loop, see qcompile.qat.quantizers.attach_gates).
        self.register_buffer("gate", None, persistent=False)

    def set_hard(self, hard: bool = True) -> "Quantizer":
        """Select the hard forward (the one :meth:`integer_spec` describes exactly) or soft."""
        self.hard = hard
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = getattr(self, "gate", None)
        if gate is not None and torch.compiler.is_compiling():
            # One compiled graph whichever quantizers a step switches off: ``x`` where the gate
            # is off (its gradient too), the quantized value where it is on.
            return torch.where(gate, self.fake_quantize(x), x)
        return self.fake_quantize(x) if self.enabled else x

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def integer_spec(self) -> IntegerSpec:
        raise NotImplementedError

    def initialize(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def channel_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a (channels, -1) matrix, one row per channel (a single row when per tensor)."""
        if not self.per_channel:
            return x.reshape(1, -1)
        if x.dim() == 0 or x.shape[self.channel_axis] != self.channels:
            raise ConfigError(
                f"{type(self).__name__}: expected {self.channels} channels along axis "
                f"{self.channel_axis}, got a tensor of shape {tuple(x.shape)}"
            )
        return x.movedim(self.channel_axis, 0).reshape(self.channels, -1)

    def param_shape(self, x: torch.Tensor) -> list[int]:
        """Shape that broadcasts a per-channel parameter against ``x`` along ``channel_axis``."""
        shape = [1] * x.dim()
        if self.per_channel:
            shape[self.channel_axis] = self.channels
        return shape

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        sign = "signed" if self.signed else "unsigned"
        return f"bits={self.bits}, {sign}, {kind}"
