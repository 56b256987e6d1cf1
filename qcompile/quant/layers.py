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
            macs = layer_macs(layer, output_shape(node)) or 0
            sites.append(LayerSite(node, module, layer.weight.numel(), macs))
    return sites


def layer_macs(layer: nn.Module, out_shape: tuple[int, ...] | None) -> int | None:
    """Multiply-accumulates of one call: each output element reads one row of the weight.

    For a convolution that row has ``in_channels / groups * kernel elements`` entries; for a
    linear layer ``in_features``. A weight with fewer than two dimensions (a norm's scale)
    multiplies elementwise, and an embedding looks rows up: no MACs. None without a shape.
    """
    weight = getattr(layer, "weight", None)
    if out_shape is None or not isinstance(weight, torch.Tensor):
        return None
    if weight.dim() < 2 or isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
        return 0
    return int(torch.Size(out_shape).numel()) * int(weight[0].numel())
