"""DoReFa-Net (Zhou et al. 2016): fixed uniform quantizers with straight-through gradients.

``quantize_k(r) = round((2^k - 1) r) / (2^k - 1)`` for ``r`` in [0, 1] (Sec. 2.2), rounded
straight through.

Weights (Sec. 2.3), for k >= 2: ``w_q = 2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1``, in
[-1, 1]; for k = 1: ``w_q = sign(w) E(|w|)`` with the identity as the backward. The normalizer
(``max|tanh(w)|`` or ``E(|w|)``, per tensor as in the paper, or per output channel) is refreshed
from the weight on every training forward, as the paper computes it, and frozen in eval mode so the
integer meaning is a fixed function. Because ``tanh`` is not affine, that meaning is a threshold
list on the raw weight: code ``c`` begins where ``tanh(w) / (2m) + 1/2`` reaches ``(c - 1/2) / n``,
``t_c = atanh(2m ((c - 1/2) / n - 1/2))``, evaluated in float64 and rounded up to the weight's
float type. The hard forward looks the codes up in that same list, so it matches the integer meaning
bit for bit; the gradient follows the paper's smooth expression (straight through the rounding).
Zero sits exactly on the middle threshold and maps to the positive level ``1/n``.

One deliberate change for k >= 2: the paper's levels lie in [-1, 1] whatever the weight's
magnitude, which a batch norm right after the layer absorbs. qcompile folds batch norm into the
weights, so the levels are scaled by ``r``, the least-squares fit of the levels to the weight
(``r = <w, u> / <u, u>`` for the unit levels ``u``, per tensor or per channel, refreshed and frozen
with the normalizer): the quantized layer keeps the float layer's scale and energy. (Scaling by
``max|w|`` instead inflates a 2-bit layer's output by about 1.4 and a deep network's signal grows
without bound.) Where a batch norm does follow, ``r`` is a constant factor it absorbs.

Activations (Sec. 2.4): ``quantize_k(clip(x, 0, 1))``, unsigned only. The paper's networks keep
activations in [0, 1]; ours may not, so the clip is ``[0, bound]`` with ``bound`` a fixed range
calibrated as the clip of least squared error on the calibration activations (1 without
calibration, the paper's case). It is
computed as ``round(x / step) * step`` with ``step = bound / (2^k - 1)``, bit exact with its
integer meaning. The bound is not learned (learning it is PACT).
"""

import torch

from qcompile.errors import ConfigError
from qcompile.quant.base import (
    IntegerSpec,
    Quantizer,
    clamp_through,
    replace_gradient,
    round_ste,
    threshold_index,
)
from qcompile.quant.fit import ACTIVATION_PEAK, best_steps
from qcompile.quant.registry import register_method

MIN_NORMALIZER = 1e-12


def round_up_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest ``dtype`` numbers that are >= the (float64) ``values``."""
    rounded = values.to(dtype)
    below = rounded.to(values.dtype) < values
    return torch.where(below, torch.nextafter(rounded, torch.full_like(rounded, float("inf"))),
                       rounded)


class DoReFaWeightQuantizer(Quantizer):
    """DoReFa's weight quantizer: tanh-normalized uniform levels times a fitted ``r``, or sign x E|w|.

    Codes are the signed ``b``-bit integers; the value of code ``c`` is ``(2c + 1) / n * r``
    (scale ``2 r / n``, zero point ``-1/2``; the paper's ``2 c' / n - 1`` with
    ``c' = c + 2^(b-1)``, rescaled), or ``c E(|w|)`` with codes ``{-1, 1}`` at one bit.
    """

    projection = False

    def __init__(self, bits, *, signed, per_channel=False, channels=1, channel_axis=0):
        if not signed:
            raise ConfigError(
                "DoReFa weights are symmetric in [-1, 1]: build the weight quantizer with "
                "signed=True"
            )
        super().__init__(bits, signed=signed, per_channel=per_channel, channels=channels,
                         channel_axis=channel_axis)
        self.levels = 2**bits - 1
        self.register_buffer("normalizer", torch.ones(self.channels))
        self.register_buffer("magnitude", torch.ones(self.channels))

    def measure(self, x: torch.Tensor) -> torch.Tensor:
        """The normalizer of ``x``: ``max|tanh(x)|`` (k >= 2) or ``E(|x|)`` (k = 1), per channel.

        The maximum's gradient goes to the element ``max`` picks (one of them, at a tie). The
        even split ``amax`` gives ties finds them again in the backward by comparing with the
        maximum, which a compiled backward that recomputes ``x`` may not reproduce bit for bit:
        it then finds none and divides by zero.
        """
        rows = self.channel_rows(x)
        if self.bits == 1:
            return rows.detach().abs().mean(dim=1)
        return torch.tanh(rows).abs().max(dim=1).values

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            m = self.measure(x)
            self.normalizer.copy_(m.detach())
            if self.bits > 1:
                self.magnitude.copy_(self._fitted_magnitude(x.detach(), m.detach()))
        else:
            m = self.normalizer
        m = m.clamp_min(MIN_NORMALIZER)
        shape = self.param_shape(x)
        if self.bits == 1:
            one = torch.ones((), dtype=x.dtype, device=x.device)
            value = torch.where(x >= 0, one, -one) * m.detach().reshape(shape).to(x.dtype)
            return replace_gradient(value, x)
        thresholds = self._thresholds(m.detach(), x.dtype)
        index = threshold_index(x.detach(), thresholds, self.channel_axis)
        scale, zero_point = self._affine(x.dtype)
        codes = (index - 2 ** (self.bits - 1)).to(x.dtype)
        value = (codes - zero_point) * scale.reshape(shape)
        unit = clamp_through(torch.tanh(x) / (2 * m.reshape(shape)) + 0.5, 0, 1)
        return replace_gradient(value, (2 * unit - 1) * self._magnitude().reshape(shape).to(x.dtype))

    def integer_spec(self) -> IntegerSpec:
        m = self.normalizer.clamp_min(MIN_NORMALIZER).detach().clone()
        axis = self.channel_axis if self.per_channel else None
        if self.bits == 1:
            return IntegerSpec(1, torch.tensor([-1, 1]), m, torch.zeros(m.shape, dtype=torch.int64),
                               axis, thresholds=torch.zeros(1, dtype=m.dtype))
        half = 2 ** (self.bits - 1)
        scale, zero_point = self._affine(m.dtype)
        return IntegerSpec(
            self.bits,
            codes=torch.arange(-half, half),
            scale=scale.clone() if self.per_channel else scale.reshape(()).clone(),
            zero_point=zero_point,
            axis=axis,
            thresholds=self._thresholds(m, m.dtype),
        )

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the normalizer and the magnitude from the weight (nothing else to set)."""
        x = x.detach().to(self.normalizer.dtype)
        self.normalizer.copy_(self.measure(x))
        if self.bits > 1:
            self.magnitude.copy_(self._fitted_magnitude(x, self.normalizer))

    def _fitted_magnitude(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``r = <w, u> / <u, u>`` per row: the scale that best fits the unit levels ``u`` to w."""
        thresholds = self._thresholds(m.clamp_min(MIN_NORMALIZER), x.dtype)
        index = threshold_index(x, thresholds, self.channel_axis)
        unit = (2 * index.to(x.dtype) - self.levels) / self.levels
        w, u = self.channel_rows(x), self.channel_rows(unit)
        return ((w * u).sum(dim=1) / (u * u).sum(dim=1)).clamp_min(MIN_NORMALIZER)

    def _magnitude(self) -> torch.Tensor:
        return self.magnitude.clamp_min(MIN_NORMALIZER)

    def _affine(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale ``2 max|w| / n`` (per channel) and zero point ``-1/2`` of the level values."""
        scale = self._magnitude().to(dtype) * (2.0 / self.levels)
        return scale, torch.tensor(-0.5, dtype=dtype)

    def _thresholds(self, m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``t_c = atanh(2m ((c - 1/2) / n - 1/2))`` for c = 1..n; (n,) or (channels, n)."""
        c = torch.arange(1, self.levels + 1, dtype=torch.float64, device=m.device)
        unit = (c - 0.5) / self.levels - 0.5
        t = torch.atanh(2 * m.to(torch.float64).reshape(-1, 1) * unit)
        t = round_up_to(t, dtype)
        return t if self.per_channel else t.reshape(-1)


class DoReFaActivationQuantizer(Quantizer):
    """DoReFa's activation quantizer: ``quantize_k(clip(x, 0, 1))`` (Sec. 2.4), no parameters."""

    def __init__(self, bits, *, signed, per_channel=False, channels=1, channel_axis=0):
        if signed:
            raise ConfigError(
                "DoReFa activations are clipped to [0, 1] and so unsigned: build the activation "
                "quantizer with signed=False, or pick a method with signed activations (lsq, pact)"
            )
        super().__init__(bits, signed=signed, per_channel=per_channel, channels=channels,
                         channel_axis=channel_axis)
        self.levels = 2**bits - 1
        self.register_buffer("bound", torch.tensor(1.0))

    def step(self) -> torch.Tensor:
        return self.bound / self.levels

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        step = self.step().to(x.dtype)
        return round_ste(clamp_through(x / step, 0, self.levels)) * step

    def integer_spec(self) -> IntegerSpec:
        return IntegerSpec(self.bits, torch.arange(0, self.levels + 1), self.step().clone(),
                           torch.tensor(0))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Calibrate the fixed clip bound: least squared error on the activations (kept if 0)."""
        rows = x.detach().to(self.bound.dtype).reshape(1, -1)
        bound = best_steps(rows, 0, self.levels, ACTIVATION_PEAK)[0] * self.levels
        if bound > MIN_NORMALIZER:
            self.bound.copy_(bound)


register_method(
    "dorefa",
    DoReFaWeightQuantizer,
    DoReFaActivationQuantizer,
    paper="Zhou et al., DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with "
          "Low Bitwidth Gradients, 2016",
)
