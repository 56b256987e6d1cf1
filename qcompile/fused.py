"""A layer and the batch norm after it, trained with the quantized weight and deployed folded.

The weight quantizer sees the layer's weight normalized per output channel, ``w / n``, with ``n``
the channel's root mean square relative to that of the folded weight ``w * |gamma| / sigma`` when
the module was built (``sigma = sqrt(running_var + eps)``): ``w / n`` has, and keeps, the scale
the folded weight had, the scale the methods' initializations and learning rates were tuned at,
but is not the folded weight. :class:`ConvBatchNorm` keeps the float layer and the batch norm
with live statistics:

- training: ``bn(layer(x, q(w / n) * n) + b)``, the batch norm normalising with batch statistics
  and updating its running statistics exactly as the unfused pair would;
- eval, or after :meth:`ConvBatchNorm.freeze_statistics`: ``layer(x, q(w / n)) * f + b_fold``
  with ``f = n * gamma / sigma`` per output channel, which is what the deployed layer computes:
  the integer weight is the codes of ``q(w / n)`` and ``f`` joins its per-channel scale. (``f``
  multiplies the output, not the weight: ``q(w / n) * f`` in float32 is off its grid by a
  rounding per weight, and the sums it gives stray from the integer program's at more than
  rounding ties.)

Why not the folded weight (Jacob et al. 2018, sec. 3.2): its codes are a function of the running
variance. At 2-4 bits a shift of the running statistics flips codes, the batch statistics then
jump and the moving average lags behind them, and validation accuracy swings by tens of points
from one epoch to the next (QIL and LSQ at W2A2 on mnist5k, benchmarks/RESULTS.md); re-estimating
the statistics moves the codes again. Why not the bare ``w``: the batch norm makes the loss blind
to each channel's scale, which then drifts (QIL's weights shrank 7-fold in 125 steps against an
interval that stayed put, most codes went to zero, and W2A2 ended 1.2 points lower). ``w / n``
has neither problem: its codes depend on neither the statistics nor the scale, and the training
loop re-estimates the statistics before each validation (:mod:`qcompile.qat.batchnorm`; Nagel et
al. 2022, "Overcoming Oscillations in Quantization-Aware Training").
"""

import copy

import torch
from torch import nn
from torch.func import functional_call

from qcompile.ir.trace import register_leaf_type

FOLDABLE_PAIRS: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Linear, nn.BatchNorm1d),
)
"""Layer types and the batch-norm type that may follow each of them."""

TINY = 1e-12
"""Floor of a norm that divides (a channel whose weights are all zero)."""


def _root_mean_square(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel (dimension 0), the root mean square of ``weight``."""
    return weight.pow(2).mean(dim=tuple(range(1, weight.dim()))).sqrt()


@register_leaf_type
class ConvBatchNorm(nn.Module):
    """A Conv1d, Conv2d (any groups) or Linear followed by its BatchNorm, trained quantized.

    ``weight_quantizer`` (the identity until quantizers are inserted) sees the layer's weight
    normalized per output channel to the folded weight's scale at construction; that norm, ``gamma`` and the running statistics fold into the
    output as a per-channel factor.
    """

    def __init__(self, layer: nn.Module, bn: nn.BatchNorm1d | nn.BatchNorm2d):
        super().__init__()
        self.layer = layer
        self.bn = bn
        self.weight_quantizer: nn.Module = nn.Identity()
        with torch.no_grad():
            folded = layer.weight * self.bn_factor().abs().reshape(
                -1, *[1] * (layer.weight.dim() - 1))
            self.register_buffer("reference_norm", _root_mean_square(folded).clone())
        self.statistics_frozen = False
        self.train(bn.training)

    @property
    def updates_statistics(self) -> bool:
        """True while a forward normalises with batch statistics and updates the running ones."""
        return self.training and not self.statistics_frozen

    def freeze_statistics(self) -> None:
        """Stop updating the running statistics and train with the folded form from now on."""
        self.statistics_frozen = True

    def weight_norm(self) -> torch.Tensor:
        """Per output channel ``n``: the root mean square of the layer's weight relative to
        that of the folded weight when this module was built, so that ``w / n`` starts out as
        large as the folded weight and stays so."""
        return (_root_mean_square(self.layer.weight)
                / self.reference_norm.clamp_min(TINY)).clamp_min(TINY)

    def normalized_weight(self) -> torch.Tensor:
        """``w / n``: what the weight quantizer sees."""
        weight = self.layer.weight
        return weight / self.weight_norm().reshape(-1, *[1] * (weight.dim() - 1))

    def bn_factor(self) -> torch.Tensor:
        """Per output channel ``gamma / sqrt(running_var + eps)``."""
        gamma = self.bn.weight if self.bn.weight is not None else 1.0
        return gamma * torch.rsqrt(self.bn.running_var + self.bn.eps)

    def fold_factor(self) -> torch.Tensor:
        """Per output channel ``n * gamma / sqrt(running_var + eps)``: what multiplies the
        quantized normalized weight in the deployed layer."""
        return self.weight_norm() * self.bn_factor()

    def quantized_weight(self) -> torch.Tensor:
        """The weight the deployed layer computes with: ``q(w / n) * fold_factor()``."""
        weight = self.weight_quantizer(self.normalized_weight())
        return weight * self.fold_factor().reshape(-1, *[1] * (weight.dim() - 1))

    def folded_bias(self) -> torch.Tensor:
        bias = self.layer.bias if self.layer.bias is not None else 0.0
        beta = self.bn.bias if self.bn.bias is not None else 0.0
        return beta + (bias - self.bn.running_mean) * self.bn_factor()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_quantizer(self.normalized_weight())
        if self.updates_statistics:
            norm = self.weight_norm().reshape(-1, *[1] * (weight.dim() - 1))
            return self.bn(self._layer(x, weight * norm, self.layer.bias))
        y = self._layer(x, weight, None)
        return y * self._per_channel(self.fold_factor(), y) + self._per_channel(
            self.folded_bias(), y)

    def to_folded(self) -> nn.Module:
        """A plain layer with the folded parameters: it computes what this module does in eval."""
        layer = copy.deepcopy(self.layer)
        with torch.no_grad():
            layer.weight = nn.Parameter(self.quantized_weight().clone())
            layer.bias = nn.Parameter(self.folded_bias().clone())
        return layer

    def _per_channel(self, values: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per output channel ``values`` broadcasting over the layer's output ``y`` (channels
        last for a linear layer, dimension 1 for a convolution)."""
        if isinstance(self.layer, nn.Linear):
            return values
        return values.reshape(-1, *[1] * (y.dim() - 2))

    def _layer(self, x, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return functional_call(self.layer, {"weight": weight, "bias": bias}, (x,))

