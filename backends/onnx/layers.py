"""Quantized conv and linear layers as ONNX ``Conv``, ``Gemm`` or ``MatMul``.

The weight is what the layer computes with in eval mode: the weight quantizer applied to the
float weight (the batch-norm-folded weight of a fused conv-BN), written by the format's emitter
(an integer initializer and DequantizeLinear, or a float initializer and a QONNX ``Quant``). The
bias stays float (the folded batch-norm bias of a fused conv-BN): quantizing it to int32 at the
accumulator's scale would move the output of the simulated model, which adds it in float. It is
a separate ``Add`` after the layer, not the layer's third input: onnxruntime's default
optimizations (``WeightBiasQuantization``) round a Conv's or Gemm's float bias to int32 when its
weight comes from DequantizeLinear, which moves codes near a threshold and, through a deep
network, the logits; an ``Add`` they leave as it is.
"""

from torch import fx, nn

from qcompile.backends.onnx.builder import OnnxExportError, OnnxGraph
from qcompile.backends.onnx.meaning import weight_integers
from qcompile.fused import ConvBatchNorm
from qcompile.quant.base import Quantizer
from qcompile.quant.layers import base_layer, float_weight


def layer_op(graph: OnnxGraph, emitter, node: fx.Node, module: nn.Module, x: str,
             rank: int) -> tuple[str, dict]:
    """The ONNX output of layer ``node`` reading ``x`` (of rank ``rank``), and its record."""
    name = str(node.target)
    layer = base_layer(module)
    quantizer = getattr(module, "weight_quantizer", None)
    weight = float_weight(module).detach()
    if isinstance(quantizer, Quantizer):
        integers = weight_integers(quantizer, weight, f"the weight quantizer of layer {name}")
        w, record = emitter.weight(name, integers, f"layer {name}")
        record.update(weight_bits=quantizer.bits, method=quantizer.method)
    else:
        w = graph.constant(f"{name}.weight", weight.float().numpy())
        record = {"weight_bits": None, "method": None, "container": "FLOAT"}
    bias = module.folded_bias() if isinstance(module, ConvBatchNorm) else layer.bias
    linear = isinstance(layer, nn.Linear)
    output = node.name if bias is None else f"{node.name}.product"
    if linear:
        product = _linear(graph, output, [x, w], rank)
    else:
        product = _conv(graph, node, output, layer, [x, w])
    if bias is None:
        return product, record
    values = bias.detach().float().numpy()
    if not linear:
        values = values.reshape(-1, *[1] * len(layer.kernel_size))
    return graph.node("Add", [product, graph.constant(f"{name}.bias", values)], node.name), record


def _linear(graph: OnnxGraph, output: str, inputs: list[str], rank: int) -> str:
    if rank == 2:
        return graph.node("Gemm", inputs, output, transB=1)
    transposed = graph.node("Transpose", [inputs[1]], f"{output}.weight_t", perm=[1, 0])
    return graph.node("MatMul", [inputs[0], transposed], output)


def _conv(graph: OnnxGraph, node: fx.Node, output: str, layer: nn.Module, inputs: list[str]
          ) -> str:
    if layer.padding_mode != "zeros":
        raise OnnxExportError(f"layer {node.target}: padding mode {layer.padding_mode!r} has no "
                              "ONNX Conv form; use zero padding")
    kernel = list(layer.kernel_size)
    dilation = list(layer.dilation)
    if layer.padding == "valid":
        begin = end = [0] * len(kernel)
    elif layer.padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        begin = [t // 2 for t in total]
        end = [t - b for t, b in zip(total, begin, strict=True)]
    else:
        begin = end = list(layer.padding)
    return graph.node("Conv", inputs, output, kernel_shape=kernel,
                      strides=list(layer.stride), pads=begin + end, dilations=dilation,
                      group=int(layer.groups))

