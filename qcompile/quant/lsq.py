"""LSQ: Learned Step Size Quantization (Esser et al., ICLR 2020).

One learnable step size ``s`` per tensor, or per output channel. The forward is Eq. 1-2 of the
paper, ``v_bar = round(clip(v / s, -Q_N, Q_P))`` and ``v_hat = v_bar * s``, with a straight-through
round, so autograd yields the paper's step-size gradient (Eq. 3): ``round(v/s) - v/s`` inside the
range, ``-Q_N`` or ``Q_P`` where ``v`` is clipped. That gradient is multiplied by
``g = 1 / sqrt(N * Q_P)`` (Sec. 2.2: ``N`` is the number of weights a step size serves, or the
number of features per example for activations), and ``s`` starts at ``2 <|v|> / sqrt(Q_P)``
(Sec. 2.1, from the weights or the first batch of activations) up to 4 bits, at the step of
least squared rounding error from 5 bits up (:data:`LEAST_SQUARES_BITS`).

``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1) - 1`` signed; ``Q_N = 0``, ``Q_P = 2^b - 1`` unsigned. Signed
1-bit, where ``Q_P = 0`` would leave a single useful level, is binary instead (an extension, the
paper stops at 2 bits): ``v_hat = +s`` where ``v >= 0`` and ``-s`` below, the round replaced by
this sign under the same straight-through estimator, and ``s`` starts at ``<|v|>``, the binary
scale of least squared error.
"""

import math

import torch

from qcompile.quant.base import IntegerSpec, Quantizer, replace_gradient, round_ste
from qcompile.quant.fit import best_steps
from qcompile.quant.registry import register_method

MIN_STEP = 1e-8
LEAST_SQUARES_BITS = 5
"""From this bit-width up a step starts at the least-squares step instead of the paper's rule,
which is sized for the 2-4 bits the paper studies: at 8 bits its top code sits at ~22x the mean
magnitude and rounds several times coarser than the data needs. Measured on mnist5k
(``benchmarks/qat_mnist.py --methods lsq --bits 8,4,2``, seeds 0-2): W8A8 before QAT 95.00 /
96.10 / 96.90% -> 96.70 / 96.20 / 97.50% (float 96.70 / 96.10 / 97.50%); after QAT W4A4 -0.2 /
+0.1 / +0.1 points and W2A2 +0.3 / +0.2 / +0.8 points (their 8-bit first and last layers). The
cost is in training from scratch, where the tighter range clips what the untrained network grows
into: an untrained small CNN at 8 bits on digits reached 88.1% after 2 epochs instead of 92.5%
(97.2% after 8, as the float model and the paper's rule), torchvision's ResNet-18 81.9% instead of
90.6% (float 94.7%)."""


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged (bit for bit) in the forward, its gradient multiplied by ``factor``.

    LSQ's gradient scaling (Sec. 2.2). The usual ``(x - x*g).detach() + x*g`` can move ``x`` by an
    ulp, which would break the bit-exact match with the integer meaning.
    """
    return replace_gradient(x, x * factor)


class LSQQuantizer(Quantizer):
    """A uniform quantizer with a learned step size (the shared part of both roles)."""

    def __init__(self, bits, *, signed, per_channel=False, channels=1, channel_axis=0):
        super().__init__(bits, signed=signed, per_channel=per_channel, channels=channels,
                         channel_axis=channel_axis)
        self.binary = signed and bits == 1
        if self.binary:
            self.q_n, self.q_p = 1, 1
        elif signed:
            self.q_n, self.q_p = 2 ** (bits - 1), 2 ** (bits - 1) - 1
        else:
            self.q_n, self.q_p = 0, 2**bits - 1
        self.step = torch.nn.Parameter(torch.ones(self.channels))

    def features_per_step(self, x: torch.Tensor) -> int:
        """``N`` of the gradient scale: how many values one step size quantizes per example."""
        raise NotImplementedError

    def step_size(self) -> torch.Tensor:
        """The step sizes in use (one per channel, or one), kept positive.

        The floor passes its gradient straight through, so a step an optimizer pushed below zero
        still learns its way back instead of sticking at the floor.
        """
        return replace_gradient(self.step.clamp_min(MIN_STEP), self.step)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        factor = 1.0 / math.sqrt(self.features_per_step(x) * self.q_p)
        s = scale_gradient(self.step_size(), factor).reshape(self.param_shape(x))
        if self.binary:
            one = torch.ones((), dtype=x.dtype, device=x.device)
            level = replace_gradient(torch.where(x >= 0, one, -one), torch.clamp(x / s, -1, 1))
        else:
            level = round_ste(torch.clamp(x / s, -self.q_n, self.q_p))
        return level * s

    def integer_spec(self) -> IntegerSpec:
        """Codes ``-Q_N..Q_P`` with ``code = clamp(round(x / s))``, value ``code * s``.

        Binary: codes ``{-1, 1}`` split by the threshold 0, value ``code * s``.
        """
        s = self.step_size().detach().clone()
        zero = torch.zeros(s.shape, dtype=torch.int64)
        axis = self.channel_axis if self.per_channel else None
        if self.binary:
            return IntegerSpec(1, torch.tensor([-1, 1]), s, zero, axis,
                               thresholds=torch.zeros(1, dtype=s.dtype))
        return IntegerSpec(self.bits, torch.arange(-self.q_n, self.q_p + 1), s, zero, axis)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """``s = 2 <|v|> / sqrt(Q_P)`` (Sec. 2.1), per channel if per-channel; binary ``<|v|>``;
        from :data:`LEAST_SQUARES_BITS` bits up, :meth:`initialize_least_squares`."""
        if self.bits >= LEAST_SQUARES_BITS and not self.binary:
            self.initialize_least_squares(x)
            return
        mean_abs = self.channel_rows(x.detach().abs().to(self.step.dtype)).mean(dim=1)
        step = mean_abs if self.binary else 2 * mean_abs / math.sqrt(self.q_p)
        self.step.copy_(step.clamp_min(MIN_STEP))

    @torch.no_grad()
    def initialize_least_squares(self, x: torch.Tensor) -> None:
        """The step of least squared rounding error on ``x`` (binary keeps :meth:`initialize`).

        For 8-bit tensors, where the paper's rule, sized for 2-4 bits, puts the top code at
        ``2 <|v|> sqrt(Q_P)`` (~22x the mean magnitude) and rounds several times coarser than
        the data needs."""
        if self.binary:
            self.initialize(x)
            return
        rows = self.channel_rows(x.detach().to(self.step.dtype))
        self.step.copy_(best_steps(rows, -self.q_n, self.q_p).clamp_min(MIN_STEP))


class LSQWeightQuantizer(LSQQuantizer):
    """LSQ for weights: ``N = N_W``, the weights per step size (the tensor, or one channel)."""

    def features_per_step(self, x: torch.Tensor) -> int:
        return max(x.numel() // self.channels, 1)


class LSQActivationQuantizer(LSQQuantizer):
    """LSQ for activations: ``N = N_F``, the features of one example (dim 0 is the batch)."""

    def features_per_step(self, x: torch.Tensor) -> int:
        per_example = x[0].numel() if x.dim() > 1 else x.numel()
        return max(per_example // self.channels, 1)


register_method(
    "lsq",
    LSQWeightQuantizer,
    LSQActivationQuantizer,
    paper="Esser et al., Learned Step Size Quantization, ICLR 2020",
)
