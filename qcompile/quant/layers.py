"""The layers qcompile quantizes, found in a graph, with their float weights and costs."""

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from qcompile.fused import ConvBatchNorm
from qcompile.ir.shapes import output_shape
from qcompile.ir.trace import QUANTIZABLE_LAYERS


@dataclass(frozen=True)
class LayerSite:
    """A quantizable layer: its fx node, module, and cost figures."""

    node: fx.Node
    module: nn.Module
    params: int
    macs: int

    @property
    def name(self) -> str:
        return str(self.node.target)

    @property
    def weight(self) -> torch.Tensor:
        return float_weight(self.module)


def float_weight(module: nn.Module) -> torch.Tensor:
    """The float weight a weight quantizer sees (for a fused conv-BN, the folded weight)."""
    if isinstance(module, ConvBatchNorm):
        return module.folded_weight()
    inner = getattr(module, "layer", module)
    return inner.weight


def base_layer(module: nn.Module) -> nn.Module:
    """The Conv/Linear inside a wrapper (fused conv-BN, quantized layer), or the module itself."""
    while not isinstance(module, QUANTIZABLE_LAYERS) and hasattr(module, "layer"):
        module = module.layer
    return module


def is_quantizable(module: nn.Module) -> bool:
    return isinstance(base_layer(module), QUANTIZABLE_LAYERS)


def quantizable_layers(gm: fx.GraphModule) -> list[LayerSite]:
    """Every call of a quantizable layer in graph order; MACs need propagated shapes."""
    modules = dict(gm.named_modules())
    sites = []
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is not None and is_quantizable(module):
            layer = base_layer(module)
            sites.append(LayerSite(node, module, layer.weight.numel(), layer_macs(node, layer)))
    return sites


def layer_macs(node: fx.Node, layer: nn.Module) -> int:
    """Multiply-accumulates of one call: output elements x (input channels per group x kernel)."""
    shape = output_shape(node)
    if shape is None:
        return 0
    outputs = int(torch.Size(shape).numel())
    weight = layer.weight
    return outputs * int(weight[0].numel())
