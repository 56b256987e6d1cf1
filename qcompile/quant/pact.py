"""PACT: Parameterized Clipping Activation (Choi et al. 2018).

Activations are clipped to ``[0, alpha]`` with a learnable ``alpha`` (Eq. 1,
``y = 0.5 (|x| - |x - alpha| + alpha)``) and quantized uniformly on k bits (Eq. 2,
``y_q = round(y (2^k - 1) / alpha) alpha / (2^k - 1)``). The backward is the paper's (Eq. 3):
straight through the rounding, ``dy_q/dx = 1`` on ``[0, alpha)`` and 0 elsewhere,
``dy_q/dalpha = 1`` where ``x >= alpha`` and 0 elsewhere. The step ``alpha / (2^k - 1)`` is computed
once and used for both the division and the multiplication, as the integer meaning does, so the
hard forward is bit exact with it. The paper adds an L2 penalty on ``alpha`` to the loss; that is
the training loop's business (:meth:`PACTActivationQuantizer.clip_level` is the tensor to
penalize).

Signed activations (an extension): clip to ``[-alpha, alpha]`` on the symmetric grid of
``2^(b-1) - 1`` steps per side, ``dy_q/dalpha = -1`` where ``x <= -alpha``; this needs 2 bits or
more.

Initialization: the paper starts every ``alpha`` at 10 and lets training (with the L2 penalty) pull
it in. With calibration activations at hand we start from the clip of least squared quantization
error on them instead (a search over clip levels, :func:`qcompile.quant.fit.best_steps`): at 2
bits a loose clip such as a high percentile leaves nearly every activation in the lowest level,
and a deep network's signal dies within a few layers; the least-squares clip keeps it.

Weights: PACT quantizes weights with DoReFa's scheme (Sec. 3), so its weight quantizer is DoReFa's.
"""

import torch

from qcompile.errors import ConfigError
from qcompile.quant.base import IntegerSpec, Quantizer, replace_gradient, step_mask
from qcompile.quant.dorefa import DoReFaWeightQuantizer
from qcompile.quant.fit import ACTIVATION_PEAK, best_steps
from qcompile.quant.registry import register_method

MIN_ALPHA = 1e-8


class Clip(torch.autograd.Function):
    """``clamp(x, 0, alpha)`` (``[-alpha, alpha]`` signed) with PACT's gradient (Eq. 3): 1 to ``x``
    strictly inside, to ``alpha`` the sum of the gradient where ``x >= alpha`` (less that where
    ``x <= -alpha``, signed), summed over the dimensions ``alpha`` is broadcast along.

    The same function as ``torch.where(x >= alpha, alpha, relu(x))`` under autograd, written out:
    from the ``where`` form inductor generated a backward whose batch-norm reduction ran on one
    thread (a compiled W2A2 small-CNN step 15.2 -> 12.7 ms, float 12.0, in one process)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, signed: bool) -> torch.Tensor:
        ctx.save_for_backward(x, alpha)
        ctx.signed = signed
        lower = torch.where(x <= -alpha, -alpha, x) if signed else torch.relu(x)
        return torch.where(x >= alpha, alpha, lower)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, alpha = ctx.saved_tensors
        low = -alpha if ctx.signed else torch.zeros_like(alpha)
        if not torch.compiler.is_compiling():
            zero = torch.zeros_like(grad)
            over, under = x >= alpha, x <= low
            grad_alpha = torch.where(over, grad, zero)
            if ctx.signed:
                grad_alpha = grad_alpha - torch.where(under, grad, zero)
            return (torch.where(over | under, zero, grad), grad_alpha.sum_to_size(alpha.shape),
                    None)
        # Compiled, the masks are float steps (step_mask): as bool tensors, the graph saved them
        # instead of x, and a 4-bit quantizer on 64x16x28x28 took 6-11 ms instead of 0.5-0.8.
        inside = step_mask(alpha - x, 0.0) * step_mask(x - low, 0.0)
        grad_alpha = grad * step_mask(x - alpha, 1.0)
        if ctx.signed:
            grad_alpha = grad_alpha - grad * step_mask(low - x, 1.0)
        return grad * inside, grad_alpha.sum_to_size(alpha.shape), None


class PACTActivationQuantizer(Quantizer):
    """Clip to a learned ``alpha``, quantize uniformly (PACT Eq. 1-3)."""

    def __init__(self, bits, *, signed, per_channel=False, channels=1, channel_axis=0):
        if signed and bits < 2:
            raise ConfigError(
                "PACT signed activations need bits >= 2 (1 bit leaves only the level 0 on a "
                "symmetric grid): raise the bit-width or quantize this tensor unsigned"
            )
        super().__init__(bits, signed=signed, per_channel=per_channel, channels=channels,
                         channel_axis=channel_axis)
        self.levels = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.alpha = torch.nn.Parameter(torch.full((self.channels,), 10.0))

    def clip_level(self) -> torch.Tensor:
        """``alpha`` as used (one per channel, or one), kept positive.

        The floor passes its gradient straight through, so an ``alpha`` an optimizer pushed below
        zero still learns its way back instead of sticking at the floor.
        """
        return replace_gradient(self.alpha.clamp_min(MIN_ALPHA), self.alpha)

    def step_size(self) -> torch.Tensor:
        """``alpha / (2^k - 1)`` (or ``alpha / (2^(b-1) - 1)`` signed), without gradient."""
        return self.clip_level().detach() / self.levels

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.param_shape(x)
        step = self.step_size().reshape(shape)
        low = -self.levels if self.signed else 0
        value = torch.clamp(torch.round(x.detach() / step), low, self.levels) * step
        return replace_gradient(value, self.clip(x, self.clip_level().reshape(shape)))

    def clip(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """PACT's clipping with the paper's gradient (ties at ``x == alpha`` go to ``alpha``)."""
        return Clip.apply(x, alpha, self.signed)

    def integer_spec(self) -> IntegerSpec:
        step = self.step_size().clone()
        low = -self.levels if self.signed else 0
        axis = self.channel_axis if self.per_channel else None
        return IntegerSpec(self.bits, torch.arange(low, self.levels + 1), step,
                           torch.zeros(step.shape, dtype=torch.int64), axis)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """``alpha`` = the clip of least squared error on the calibration activations."""
        rows = self.channel_rows(x.detach().to(self.alpha.dtype))
        rows = rows if self.signed else torch.relu(rows)
        low = -self.levels if self.signed else 0
        alpha = best_steps(rows, low, self.levels, ACTIVATION_PEAK) * self.levels
        self.alpha.copy_(torch.where(alpha > MIN_ALPHA, alpha, torch.ones_like(alpha)))


class PACTWeightQuantizer(DoReFaWeightQuantizer):
    """PACT's weights: DoReFa's weight quantizer (Choi et al. 2018, Sec. 3)."""


register_method(
    "pact",
    PACTWeightQuantizer,
    PACTActivationQuantizer,
    paper="Choi et al., PACT: Parameterized Clipping Activation for Quantized Neural Networks, "
          "2018",
)
