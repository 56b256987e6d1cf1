"""A layer and the batch norm after it, trained with the quantized weight and deployed folded.

The weight quantizer sees the layer's own weight ``w``, not the folded ``w * gamma / sigma``
(``sigma = sqrt(running_var + eps)``). :class:`ConvBatchNorm` keeps the float layer and the batch
norm with live statistics:

- training: ``bn(layer(x, q(w)) + b)``, the batch norm normalising with batch statistics and
  updating its running statistics exactly as the unfused pair would;
- eval, or after :meth:`ConvBatchNorm.freeze_statistics`: ``layer(x, q(w)) * f + b_fold`` with
  ``f = gamma / sigma`` per output channel, which is what the deployed layer computes: the
  integer weight is ``q(w)``'s codes and ``f`` joins its per-channel scale. (``f`` multiplies
  the output, not the weight: ``q(w) * f`` in float32 is off its grid by a rounding per weight,
  and the sums it gives stray from the integer program's at more than rounding ties.)

Quantizing the folded weight instead (Jacob et al. 2018, sec. 3.2) makes the weight's codes a
function of the running variance: at 2-4 bits a shift of the running statistics flips codes, the
batch statistics then jump and the moving average lags behind them, and validation accuracy
swings by tens of points from one epoch to the next (measured on mnist5k, QIL and LSQ at W2A2,
benchmarks/RESULTS.md). With ``q(w)`` the codes do not depend on the statistics, which the
training loop re-estimates before each validation (:mod:`qcompile.qat.batchnorm`; Nagel et al.
2022, "Overcoming Oscillations in Quantization-Aware Training", batch-norm re-estimation).
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


@register_leaf_type
class ConvBatchNorm(nn.Module):
    """A Conv1d, Conv2d (any groups) or Linear followed by its BatchNorm, trained quantized.

    ``weight_quantizer`` (the identity until quantizers are inserted) sees the layer's weight;
    the running statistics and ``gamma`` fold into the output as a per-channel factor.
    """

    def __init__(self, layer: nn.Module, bn: nn.BatchNorm1d | nn.BatchNorm2d):
        super().__init__()
        self.layer = layer
        self.bn = bn
        self.weight_quantizer: nn.Module = nn.Identity()
        self.statistics_frozen = False
        self.train(bn.training)

    @property
    def updates_statistics(self) -> bool:
        """True while a forward normalises with batch statistics and updates the running ones."""
        return self.training and not self.statistics_frozen

    def freeze_statistics(self) -> None:
        """Stop updating the running statistics and train with the folded form from now on."""
        self.statistics_frozen = True

    def fold_factor(self) -> torch.Tensor:
        """Per output channel ``gamma / sqrt(running_var + eps)``."""
        gamma = self.bn.weight if self.bn.weight is not None else 1.0
        return gamma * torch.rsqrt(self.bn.running_var + self.bn.eps)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the deployed layer computes with: ``q(w) * fold_factor()``."""
        weight = self.weight_quantizer(self.layer.weight)
        return weight * self.fold_factor().reshape(-1, *[1] * (weight.dim() - 1))

    def folded_bias(self) -> torch.Tensor:
        bias = self.layer.bias if self.layer.bias is not None else 0.0
        beta = self.bn.bias if self.bn.bias is not None else 0.0
        return beta + (bias - self.bn.running_mean) * self.fold_factor()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_quantizer(self.layer.weight)
        if self.updates_statistics:
            return self.bn(self._layer(x, weight, self.layer.bias))
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

