"""The ops between quantizers, as ONNX nodes: layers, clamps, joins, pools, flatten.

Each handler takes the fx node, its module (or None), the ONNX names of its tensor arguments and
the shapes recorded by shape propagation, adds nodes to the :class:`OnnxGraph` and returns the
ONNX name of the result. :func:`float_op` covers the ops the integer lowering also accepts
(ReLU, ReLU6, hardtanh, add, cat, max and average pooling, flatten, dropout and identity) in
their usual spellings; anything else is :class:`OnnxExportError` naming the node.
"""

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from qcompile.backends.onnx.builder import OnnxExportError, OnnxGraph

IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
AVERAGE_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
RELUS = (F.relu, torch.relu, torch.relu_, F.relu_)
ADDS = (operator.add, operator.iadd, torch.add)
MAX_POOL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.max_pool3d)
AVERAGE_POOL_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
ADAPTIVE_POOL_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
POOL_ARGUMENTS = ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                  "divisor_override"]
MAX_POOL_ARGUMENTS = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                      "return_indices"]
SUPPORTED = ("quantized conv/linear layers and quantizers, ReLU, ReLU6, hardtanh, add, cat, max "
             "and average pooling (adaptive with even windows), flatten, dropout and identity")


def float_op(graph: OnnxGraph, node: fx.Node, module: nn.Module | None, values: dict,
             shape) -> str:
    """The ONNX value of ``node``; ``values`` maps fx nodes to ONNX names, ``shape(n)`` gives a
    node's recorded output shape."""
    x = values.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if module is not None:
        return _module_op(graph, node, module, x, shape)
    target = node.target
    if node.op == "call_method":
        target = {"relu": F.relu, "relu_": F.relu, "add": torch.add, "add_": torch.add,
                  "flatten": torch.flatten, "contiguous": "identity"}.get(target, target)
    if target in RELUS:
        return graph.node("Relu", [x], node.name)
    if target in (F.relu6, F.hardtanh, F.hardtanh_):
        args = _bind(node, ["input", "min_val", "max_val"])
        low, high = (0.0, 6.0) if target is F.relu6 else (args.get("min_val", -1.0),
                                                           args.get("max_val", 1.0))
        return _clip(graph, node.name, x, low, high)
    if target in ADDS:
        return _add(graph, node, values)
    if target in (torch.cat, torch.concat):
        args = _bind(node, ["tensors", "dim"])
        return graph.node("Concat", [values[t] for t in args["tensors"]], node.name,
                          axis=int(args.get("dim", 0)))
    if target in MAX_POOL_FUNCTIONS:
        return _max_pool(graph, node, x, _bind(node, MAX_POOL_ARGUMENTS), _rank(shape, node) - 2)
    if target in AVERAGE_POOL_FUNCTIONS:
        return _average_pool(graph, node, x, _bind(node, POOL_ARGUMENTS), _rank(shape, node) - 2)
    if target in ADAPTIVE_POOL_FUNCTIONS:
        return _adaptive_pool(graph, node, x, shape)
    if target is torch.flatten:
        args = _bind(node, ["input", "start_dim", "end_dim"])
        return _flatten(graph, node, x, args.get("start_dim", 0), args.get("end_dim", -1), shape)
    if target in (F.dropout, "identity"):
        return x
    raise unsupported(node, module)


def unsupported(node: fx.Node, module: nn.Module | None) -> OnnxExportError:
    if module is not None:
        what = f"module {node.target} of type {type(module).__name__}"
    elif node.op == "call_function":
        what = f"function {getattr(node.target, '__name__', node.target)}"
    else:
        what = f"{node.op} {node.target}"
    return OnnxExportError(f"node {node.name} ({what}) has no ONNX form in the exporter, which "
                           f"supports {SUPPORTED}; replace the op or mark it a leaf the export "
                           "need not see")


def _module_op(graph, node, module, x, shape) -> str:
    if isinstance(module, nn.ReLU):
        return graph.node("Relu", [x], node.name)
    if isinstance(module, nn.ReLU6):
        return _clip(graph, node.name, x, 0.0, 6.0)
    if isinstance(module, nn.Hardtanh):
        return _clip(graph, node.name, x, module.min_val, module.max_val)
    if isinstance(module, IDENTITIES):
        return x
    if isinstance(module, MAX_POOLS):
        return _max_pool(graph, node, x, vars(module), _rank(shape, node) - 2)
    if isinstance(module, AVERAGE_POOLS):
        return _average_pool(graph, node, x, vars(module), _rank(shape, node) - 2)
    if isinstance(module, ADAPTIVE_POOLS):
        return _adaptive_pool(graph, node, x, shape)
    if isinstance(module, nn.Flatten):
        return _flatten(graph, node, x, module.start_dim, module.end_dim, shape)
    raise unsupported(node, module)


def _clip(graph: OnnxGraph, name: str, x: str, low: float, high: float) -> str:
    """``Min(Max(x, low), high)``: the same as ``Clip``, which onnxruntime 1.32 cannot fuse into a
    4-bit QuantizeLinear that follows it (its session then fails to load)."""
    low, high = (graph.constant(f"clip_{v:g}", np.float32(v), key=("clip", float(v)))
                 for v in (low, high))
    floor = graph.node("Max", [x, low], f"{name}.floor")
    return graph.node("Min", [floor, high], name)


def _add(graph: OnnxGraph, node: fx.Node, values: dict) -> str:
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
        raise unsupported(node, None)
    operands = [values[a] if isinstance(a, fx.Node) else
                graph.constant(f"{node.name}.constant", np.float32(a)) for a in node.args]
    return graph.node("Add", operands, node.name)


def _max_pool(graph, node, x, args: dict, dims: int) -> str:
    if args.get("return_indices"):
        raise OnnxExportError(f"node {node.name}: max pooling that returns indices has no "
                              "export; return the pooled tensor only")
    kernel = _tuple(args["kernel_size"], dims)
    return graph.node("MaxPool", [x], node.name, kernel_shape=kernel,
                      strides=_tuple(args.get("stride") or kernel, dims),
                      pads=_tuple(args.get("padding", 0), dims) * 2,
                      dilations=_tuple(args.get("dilation", 1), dims),
                      ceil_mode=int(bool(args.get("ceil_mode", False))))


def _average_pool(graph, node, x, args: dict, dims: int) -> str:
    if args.get("ceil_mode") or args.get("divisor_override"):
        raise OnnxExportError(f"node {node.name}: average pooling with ceil_mode or "
                              "divisor_override has no exact ONNX AveragePool; drop the option")
    kernel = _tuple(args["kernel_size"], dims)
    return graph.node("AveragePool", [x], node.name, kernel_shape=kernel,
                      strides=_tuple(args.get("stride") or kernel, dims),
                      pads=_tuple(args.get("padding", 0), dims) * 2,
                      count_include_pad=int(args.get("count_include_pad", True)))


def _adaptive_pool(graph, node, x, shape) -> str:
    """Adaptive average pooling whose windows have one width and one stride is AveragePool."""
    sizes = shape(node.args[0])[2:]
    out = shape(node)[2:]
    if all(o == 1 for o in out):
        return graph.node("GlobalAveragePool", [x], node.name)
    kernel, strides = [], []
    for length, size in zip(sizes, out, strict=True):
        starts = [(i * length) // size for i in range(size)]
        ends = [-((-(i + 1) * length) // size) for i in range(size)]
        widths = {e - s for s, e in zip(starts, ends, strict=True)}
        stride = starts[1] - starts[0] if size > 1 else length
        if len(widths) != 1 or starts != [i * stride for i in range(size)]:
            raise OnnxExportError(f"node {node.name}: adaptive average pooling of {tuple(sizes)} "
                                  f"to {tuple(out)} has windows of different widths or strides, "
                                  "which no AveragePool makes; pick sizes that divide evenly")
        kernel.append(widths.pop())
        strides.append(stride)
    return graph.node("AveragePool", [x], node.name, kernel_shape=kernel, strides=strides)


def _flatten(graph, node, x, start: int, end: int, shape) -> str:
    rank = _rank(shape, node.args[0])
    start, end = start % rank, end % rank
    if start == 1 and end == rank - 1:
        return graph.node("Flatten", [x], node.name, axis=1)
    if start == end:
        return x
    if start == 0:
        raise OnnxExportError(f"node {node.name}: flattening the batch dimension has no export "
                              "with a variable batch; flatten from dimension 1")
    target = [0] * start + [-1] + list(shape(node.args[0])[end + 1:])
    dims = graph.constant(f"{node.name}.shape", np.array(target, dtype=np.int64))
    return graph.node("Reshape", [x, dims], node.name)


def _rank(shape, node: fx.Node) -> int:
    return len(shape(node))


def _bind(node: fx.Node, names: list[str]) -> dict:
    bound = dict(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


def _tuple(value, dims: int) -> list[int]:
    if isinstance(value, (tuple, list)):
        return [int(v) for v in value]
    return [int(value)] * dims

