"""QIL: Quantization Interval Learning (Jung et al., CVPR 2019).

"Learning to Quantize Deep Networks by Optimizing Quantization Intervals with Task Loss".
A learnable interval, centre ``c`` and half-width ``d``, splits the magnitude of the input into
three zones (Sec. 3.2): below ``c - d`` it is pruned to 0, above ``c + d`` it is clipped to the
top level, and in between the transformer maps it onto [0, 1]:

    weights:      w_hat = (alpha |w| + beta) ** gamma * sign(w)
    activations:  x_hat = alpha x + beta                       (the same with gamma = 1)
    alpha = 0.5 / d,   beta = -0.5 c / d + 0.5

``gamma`` is learned for weights (a non-linear transformer) and fixed to 1 for activations.
The discretizer rounds with a straight-through gradient, ``w_bar = round(w_hat * q_D) / q_D``,
with ``q_D = 2^(b-1) - 1`` for signed tensors (levels ``-q_D..q_D``) and ``q_D = 2^b - 1`` for
unsigned ones (levels ``0..q_D``). ``c``, ``d`` and ``gamma`` get the gradients of these
formulas (the paper's dw_bar/dc, dw_bar/dd, dw_bar/dgamma).

Integer meaning. The levels are uniform, ``code * s``, but the map from the input to a code is
non-linear, so it is stated by thresholds on the input: the transformer is increasing in
``|x|``, and the code reaches ``k`` where ``w_hat * q_D`` reaches ``k - 1/2``, i.e. at

    T_k = c - d + 2 d ((k - 1/2) / q_D) ** (1 / gamma),        k = 1..q_D

(every ``T_k`` lies inside the interval, so the pruned zone is code 0 and the clipped zone the
top code). Signed tensors mirror them: ``-x`` gets exactly ``-code(x)``. In eval the forward *is*
this threshold lookup (the value :meth:`integer_spec` states, bit for bit), and the transformer and
discretizer above supply its gradient (as ``round(w_hat * q_D) * s``, the code times the step).
In training the forward is that expression itself: it picks the lookup's code everywhere but
within rounding error of a threshold, and then its value bit for bit, and the lookup cost a fifth
of a compiled training step (small CNN, W2A2 and W4A4). Binary quantizers always look up (their
transformer is the gradient's surrogate only).

Deliberate deviations, each for deployment or for a case the paper leaves open:

- The paper's output lives on [-1, 1] (weights) or [0, 1] (activations) and relies on a
  following batch norm to absorb the scale. Here the output is multiplied by ``c + d`` (so
  ``s = (c + d) / q_D``): the top level is the clipping point itself, and a layer keeps its scale
  when batch norm has already been folded away. Gradients reach ``c`` and ``d`` through ``s`` too.
- 1-bit signed tensors (``q_D = 0`` in the paper's formula) are binary: ``+s`` for ``x >= 0``,
  ``-s`` below, ``s = c + d``; the gradient is that of ``s * sign(x) * w_hat``.
- ``d`` and ``gamma`` are kept positive (floored at small constants) so the interval and the
  thresholds stay ordered.

With a pruned zone or ``gamma != 1`` a level need not fall inside its own decision interval (the
paper's levels live in the transformer's range), so QIL is not a projection: re-quantizing its
output can change it, and :attr:`projection` is False.

Initialization (:meth:`initialize`): the paper starts each quantizer from a higher-precision
network; from a float tensor we start with no pruning (``c = d``), ``gamma = 1`` (where QIL is a
plain uniform quantizer on ``[-(c + d), c + d]``) and the clipping point ``c + d`` of least
squared quantization error, per channel when per-channel; binary starts at ``c + d = mean|x|``.
"""

import torch
from torch import nn

from qcompile.quant.base import IntegerSpec, Quantizer, replace_gradient, round_ste
from qcompile.quant.fit import best_steps, sample_columns
from qcompile.quant.registry import register_method

MIN_DISTANCE = 1e-8
MIN_GAMMA = 1e-3


class QILQuantizer(Quantizer):
    """QIL's interval quantizer; the weight quantizer learns ``gamma``, activations keep 1."""

    projection = False
    learn_gamma = False

    def __init__(self, bits, *, signed, per_channel=False, channels=1, channel_axis=0):
        super().__init__(bits, signed=signed, per_channel=per_channel, channels=channels,
                         channel_axis=channel_axis)
        self.binary = signed and bits == 1
        if self.binary:
            self.q_d = 1
        else:
            self.q_d = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.center = nn.Parameter(torch.full((self.channels,), 0.5))
        self.distance = nn.Parameter(torch.full((self.channels,), 0.5))
        gamma = torch.ones(self.channels)
        if self.learn_gamma:
            self.gamma = nn.Parameter(gamma)
        else:
            self.register_buffer("gamma", gamma)

    def interval(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c, d, gamma)`` as used: ``d`` and ``gamma`` floored to stay positive."""
        return self.center, self.distance.clamp_min(MIN_DISTANCE), self.gamma.clamp_min(MIN_GAMMA)

    def level_step(self, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``s = (c + d) / q_D``: the top level is the clipping point ``c + d``."""
        return ((c + d) / self.q_d).clamp_min(torch.finfo(c.dtype).tiny)

    def magnitude_thresholds(self, c, d, gamma) -> torch.Tensor:
        """``T_k`` (C, q_D): where ``round(w_hat * q_D)`` reaches ``k``, for ``k = 1..q_D``."""
        k = torch.arange(1, self.q_d + 1, dtype=c.dtype, device=c.device)
        u = (k - 0.5) / self.q_d
        thresholds = (c - d)[:, None] + 2 * d[:, None] * u[None, :] ** (1 / gamma[:, None])
        if self.signed:
            thresholds = thresholds.clamp_min(torch.finfo(c.dtype).tiny)
        return thresholds

    def _spec(self, c, d, gamma) -> IntegerSpec:
        s = self.level_step(c, d)
        if self.binary:
            codes = torch.tensor([-1, 1])
            thresholds = torch.zeros(self.channels, 1, dtype=c.dtype, device=c.device)
        else:
            upper = self.magnitude_thresholds(c, d, gamma)
            if self.signed:
                mirrored = -upper.flip(-1)
                lower = torch.nextafter(mirrored, torch.full_like(mirrored, float("inf")))
                upper = torch.cat([lower, upper], dim=-1)
            codes = torch.arange(-self.q_d if self.signed else 0, self.q_d + 1)
            thresholds = upper
        zero = torch.zeros(self.channels, dtype=torch.int64)
        if not self.per_channel:
            thresholds = thresholds[0]
        axis = self.channel_axis if self.per_channel else None
        return IntegerSpec(self.bits, codes, s, zero, axis, thresholds=thresholds)

    def integer_spec(self) -> IntegerSpec:
        """Codes ``-q_D..q_D`` (signed) or ``0..q_D``, thresholds ``T_k``, value ``code * s``."""
        with torch.no_grad():
            return self._spec(*(p.detach().clone() for p in self.interval()))

    def transformed(self, x, c, d, gamma) -> torch.Tensor:
        """The transformer's output in [0, 1] for ``|x|`` (signed) or ``x``: 0 pruned, 1 clipped.

        Without a learned ``gamma`` (activations) the transformer is linear and the power, whose
        value and gradient at ``gamma = 1`` are the base and 1 exactly, is left out: it would
        cost an ``exp`` and a ``log`` for every element in the forward and again in the backward.
        """
        magnitude = x.abs() if self.signed else x
        base = (0.5 / d) * magnitude + (0.5 - 0.5 * c / d)
        inside = (base > 0) & (base < 1)
        if not self.learn_gamma:
            return torch.where(inside, base, (base >= 1).to(base.dtype))
        safe = torch.where(inside, base, torch.full_like(base, 0.5))
        return torch.where(inside, safe**gamma, (base >= 1).to(base.dtype))

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        c, d, gamma = self.interval()
        shape = self.param_shape(x)
        cs, ds, gammas = (p.reshape(shape) for p in (c, d, gamma))
        t = self.transformed(x, cs, ds, gammas)
        code = t if self.binary else round_ste(t * self.q_d)
        if self.signed:
            code = torch.sign(x) * code
        surrogate = code * self.level_step(cs, ds)
        if self.training and not self.binary:
            return surrogate
        with torch.no_grad():
            spec = self._spec(c.detach(), d.detach(), gamma.detach())
            value = spec.dequantize(spec.quantize(x)).to(x.dtype)
        return replace_gradient(value, surrogate)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """No pruning, ``gamma = 1``, and ``c + d`` at the clipping point of least squared error."""
        rows = sample_columns(self.channel_rows(x.detach().to(self.center.dtype)))
        if self.binary:
            bound = rows.abs().mean(dim=1)
        else:
            qmin = -self.q_d if self.signed else 0
            bound = best_steps(rows, qmin, self.q_d) * self.q_d
        bound = bound.clamp_min(2 * MIN_DISTANCE)
        self.center.copy_(bound / 2)
        self.distance.copy_(bound / 2)
        self.gamma.fill_(1.0)


class QILWeightQuantizer(QILQuantizer):
    """QIL for weights: the transformer's exponent ``gamma`` is learned."""

    learn_gamma = True


class QILActivationQuantizer(QILQuantizer):
    """QIL for activations: a linear transformer (``gamma = 1``)."""


register_method(
    "qil",
    QILWeightQuantizer,
    QILActivationQuantizer,
    paper="Jung et al., Learning to Quantize Deep Networks by Optimizing Quantization Intervals "
    "with Task Loss, CVPR 2019",
)
