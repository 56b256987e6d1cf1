"""A layer and the batch norm after it, trained with the batch norm folded into the weight.

Quantization-aware training must quantize the weight the deployed model will use: the weight with
the batch norm folded in, ``w * gamma / sqrt(running_var + eps)`` (Jacob et al. 2018, sec. 3.2;
Krishnamoorthi 2018, sec. 3.2 "Batch normalization"). :class:`ConvBatchNorm` keeps the float layer
and the batch norm with live statistics so training still normalises with batch statistics:

- training: the layer runs with the folded, quantized weight and no bias; its output is scaled
  back by the inverse fold factor, the layer bias is added, and the batch norm normalises with
  batch statistics and updates its running statistics exactly as the unfused pair would;
- eval, or after :meth:`ConvBatchNorm.freeze_statistics`: ``layer(x, q(w_fold)) + b_fold``, which
  is what the deployed layer computes.
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


@torch.library.custom_op("qcompile::snapshot", mutates_args=())
def snapshot(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` that a compiled backward keeps rather than recomputes.

    ``x.clone()`` is not enough under ``torch.compile``: the partitioner may recompute a clone
    in the backward from ``x`` itself, after an in-place update later in the forward has changed
    it (a silently wrong gradient). An operator of our own is outside the set it recomputes, so
    the copy made in the forward is the one saved.
    """
    return x.clone()


@snapshot.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@register_leaf_type
class ConvBatchNorm(nn.Module):
    """A Conv1d, Conv2d (any groups) or Linear followed by its BatchNorm, folded for QAT.

    ``weight_quantizer`` (the identity until quantizers are inserted) sees the folded weight. A
    channel whose ``gamma`` is 0 is folded with factor 1 in training, so the rescale never divides
    by zero; the batch norm zeroes that channel anyway.
    """

    def __init__(self, layer: nn.Module, bn: nn.BatchNorm1d | nn.BatchNorm2d):
        super().__init__()
        self.layer = layer
        self.bn = bn
        self.weight_quantizer: nn.Module = nn.Identity()
        self.statistics_frozen = False
        self.train(bn.training)

    def freeze_statistics(self) -> None:
        """Stop updating the running statistics and train with the folded form from now on."""
        self.statistics_frozen = True

    def fold_factor(self) -> torch.Tensor:
        """Per output channel ``gamma / sqrt(running_var + eps)``.

        Reads a :func:`snapshot` of the running variance: the batch norm updates it in place
        later in the same forward, and the backward must see the value the forward used.
        """
        gamma = self.bn.weight if self.bn.weight is not None else 1.0
        return gamma * torch.rsqrt(snapshot(self.bn.running_var) + self.bn.eps)

    def folded_weight(self) -> torch.Tensor:
        weight = self.layer.weight
        return weight * self.fold_factor().reshape(-1, *[1] * (weight.dim() - 1))

    def folded_bias(self) -> torch.Tensor:
        bias = self.layer.bias if self.layer.bias is not None else 0.0
        beta = self.bn.bias if self.bn.bias is not None else 0.0
        return beta + (bias - self.bn.running_mean) * self.fold_factor()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.statistics_frozen:
            return self._layer(x, self.weight_quantizer(self.folded_weight()), self.folded_bias())
        factor = self.fold_factor()
        factor = torch.where(factor == 0, torch.ones_like(factor), factor)
        weight = self.layer.weight * factor.reshape(-1, *[1] * (self.layer.weight.dim() - 1))
        y = self._layer(x, self.weight_quantizer(weight), None)
        # times the reciprocal, not divided by the factor: compiled, the division is redone
        # per element in every backward pass over y (a LSQ W2A2 small-CNN step 12.1 -> 9.6 ms
        # on 2 cores); this is the batch-statistics path only, eval's folded form is unchanged
        y = y * factor.reciprocal().reshape(-1, *[1] * (y.dim() - 2))
        if self.layer.bias is not None:
            y = y + self.layer.bias.reshape(-1, *[1] * (y.dim() - 2))
        return self.bn(y)

    def to_folded(self) -> nn.Module:
        """A plain layer with the folded parameters: it computes what this module does in eval.

        Its weight is the folded weight after ``weight_quantizer``: what a deployed model uses.
        """
        layer = copy.deepcopy(self.layer)
        with torch.no_grad():
            layer.weight = nn.Parameter(self.weight_quantizer(self.folded_weight()).clone())
            layer.bias = nn.Parameter(self.folded_bias().clone())
        return layer

    def _layer(self, x, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return functional_call(self.layer, {"weight": weight, "bias": bias}, (x,))
