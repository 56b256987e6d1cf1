"""Quantization Networks' sum of sigmoids with one exponential per element instead of one per step.

The soft staircase of Quantization Networks (Yang et al., CVPR 2019, Sec. 3.2) is
``sum_i h_i * sigmoid(T * (s - b_i))`` for the scaled input ``s``: summed term by term, each of
the ``n`` steps costs an exponential and a division per element, forward and again backward, and
the exponential is most of it (a 4-bit activation quantizer of a small CNN's first block spent
most of a compiled training step on them). Every term's exponential is the same one scaled:

    exp(-T * (s - b_i)) = exp(-T * (s - c)) * exp(T * (b_i - c))

for any ``c``. :class:`SharedExponentialSum` takes ``c`` halfway between the smallest and the
largest threshold and computes the first factor once per element and the second once per
threshold, so the sum costs one exponential per element and one division per step. While the
span ``T * (max b - min b)`` is at most :data:`MAX_SPAN` (:func:`shares_exponential`), every
``|T * (b_i - c)|`` is at most ``MAX_SPAN / 2``, so the per-threshold factors are finite and
nonzero; the per-element factor overflows to infinity (or underflows to 0) only for an ``s`` more
than ``88.7 / T`` below (above) ``c``, where every term's true exponential is beyond
``exp(88.7 - MAX_SPAN / 2)``, so its sigmoid is 0 (1) to within ``exp(-48)``: the product is
then infinity (0) and the sigmoid its limit, never ``0 * inf``.

The rounding is that of the arguments: where a sigmoid is not saturated, ``T * (s - c)`` is a
float32 of magnitude up to about ``MAX_SPAN / 2``, rounded, so a sigmoid may differ by a few 1e-6
from the term-by-term one (the tests hold the sum to 1e-5 of a step). The backward recomputes
the shared exponential rather than keeping ``n`` sigmoids per element, and sums each threshold's
gradient over the elements in one pass. Past :data:`MAX_SPAN` (a 4-bit quantizer from ``T`` of
about 6, a 2-bit one from about 40) the quantizer sums term by term
(:meth:`~qcompile.quant.qn.QNQuantizer.soft`).
"""

import torch

MAX_SPAN = 80.0
"""Largest ``T * (max b - min b)`` for which the shared exponential is used: the per-threshold
factors stay normal float32 numbers (``exp(+-87)``) with a margin for the thresholds moving
between two choices (:meth:`~qcompile.quant.qn.QNQuantizer.refresh_window`), and the rounding
of the arguments stays a few 1e-6."""


def shares_exponential(biases: torch.Tensor, temperature: float) -> bool:
    """Whether every row of thresholds ``biases`` (..., n) spans at most :data:`MAX_SPAN` at
    ``temperature``."""
    with torch.no_grad():
        span = (biases.amax(dim=-1) - biases.amin(dim=-1)).max()
    return temperature * float(span) <= MAX_SPAN


def _exponentials(scaled, biases, temperature):
    """``exp(-T * (s - c))`` per element and ``exp(T * (b_i - c))`` per threshold."""
    center = (biases.amin(dim=-1) + biases.amax(dim=-1)) / 2
    shared = torch.exp(-temperature * (scaled - center))
    gains = torch.exp(temperature * (biases - center.unsqueeze(-1)))
    return shared, gains


class SharedExponentialSum(torch.autograd.Function):
    """``sum_i h_i * sigmoid(T * (s - b_i))`` for ``scaled`` ``s``, thresholds ``biases`` shaped
    ``(*shape, n)`` (``shape`` broadcasting against ``s``), ``T`` and the step heights ``h``.
    Gradients reach ``scaled`` and ``biases``; ``biases`` must satisfy
    :func:`shares_exponential`."""

    @staticmethod
    def forward(ctx, scaled, biases, temperature, heights):
        with torch.no_grad():
            shared, gains = _exponentials(scaled, biases.detach(), temperature)
        total = None
        for k in range(biases.shape[-1]):
            term = heights[k] / (1 + shared * gains[..., k])
            total = term if total is None else total + term
        ctx.save_for_backward(scaled, biases, temperature, heights)
        return total

    @staticmethod
    def backward(ctx, grad):
        scaled, biases, temperature, heights = ctx.saved_tensors
        shared, gains = _exponentials(scaled, biases, temperature)
        to_scaled, to_biases = None, []
        for k in range(biases.shape[-1]):
            step = 1 / (1 + shared * gains[..., k])
            slope = grad * (temperature * heights[k]) * (step * (1 - step))
            to_scaled = slope if to_scaled is None else to_scaled + slope
            to_biases.append(-slope.sum_to_size(biases[..., k].shape))
        return to_scaled, torch.stack(to_biases, dim=-1), None, None
