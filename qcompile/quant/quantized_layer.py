"""A Conv1d/Conv2d/Linear whose weight passes through a weight quantizer on every call."""

import torch
from torch import nn
from torch.func import functional_call

from qcompile.ir.trace import register_leaf_type


@register_leaf_type
class QuantizedLayer(nn.Module):
    """Wraps ``layer``; the forward uses ``weight_quantizer(layer.weight)`` as the weight.

    The float weight stays the trained parameter (the latent weight of the straight-through
    estimator); ``quantized_weight()`` is what the deployed layer uses.
    """

    def __init__(self, layer: nn.Module, weight_quantizer: nn.Module):
        super().__init__()
        self.layer = layer
        self.weight_quantizer = weight_quantizer

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight()
        return functional_call(self.layer, {"weight": weight, "bias": self.layer.bias}, (x,))
