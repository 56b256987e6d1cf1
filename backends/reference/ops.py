"""One function per integer op: ``(op, values, graph) -> tensor``, on int64 tensors."""

import torch
import torch.nn.functional as F

from qcompile import integer_ir as ir
from qcompile.requantization import apply_staircase

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def levels_of(codes: torch.Tensor, fmt: ir.CodeFormat) -> torch.Tensor:
    """The integer each code stands for."""
    return fmt.levels.to(codes.device)[codes]


def _source_integers(name: str, values, graph: ir.IntegerGraph) -> torch.Tensor:
    fmt = graph.values[name]
    if isinstance(fmt, ir.CodeFormat):
        return levels_of(values[name], fmt)
    return values[name]


def quantize(op: ir.Quantize, values, graph) -> torch.Tensor:
    x = values[op.input].clamp(op.low, op.high)
    codes = op.spec.quantize(x)
    return torch.searchsorted(op.spec.codes.to(codes.device), codes.contiguous())


def conv(op: ir.Conv, values, graph) -> torch.Tensor:
    x = _source_integers(op.input, values, graph)
    return CONV[x.dim() - 2](x, op.weight.integers, None, op.stride, op.padding,
                             op.dilation, op.groups)


def linear(op: ir.Linear, values, graph) -> torch.Tensor:
    return F.linear(_source_integers(op.input, values, graph), op.weight.integers)


def add(op: ir.Add, values, graph) -> torch.Tensor:
    total = _source_integers(op.inputs[0], values, graph)
    for name in op.inputs[1:]:
        total = total + _source_integers(name, values, graph)
    return total


def concat(op: ir.Concat, values, graph) -> torch.Tensor:
    return torch.cat([values[name] for name in op.inputs], dim=op.dim)


def sum_pool(op: ir.SumPool, values, graph) -> torch.Tensor:
    x = _source_integers(op.input, values, graph)
    if op.output_size is None:
        return AVG_POOL[x.dim() - 2](x, op.kernel, op.stride, op.padding, divisor_override=1)
    for axis, size in enumerate(op.output_size):
        dim = 2 + axis
        windows = _adaptive_windows(x.shape[dim], size).to(x.device)
        x = torch.tensordot(x.movedim(dim, -1), windows.t(), dims=1).movedim(-1, dim)
    return x


def _adaptive_windows(length: int, size: int) -> torch.Tensor:
    """(size, length) 0/1 matrix of adaptive pooling's windows (torch's start/end rule)."""
    rows = torch.zeros(size, length, dtype=torch.int64)
    for i in range(size):
        start, end = (i * length) // size, -((-(i + 1) * length) // size)
        rows[i, start:end] = 1
    return rows


def max_pool(op: ir.MaxPool, values, graph) -> torch.Tensor:
    x = values[op.input]
    return MAX_POOL[x.dim() - 2](x, op.kernel, op.stride, op.padding, op.dilation, op.ceil_mode)


def reshape(op: ir.Reshape, values, graph) -> torch.Tensor:
    return torch.flatten(values[op.input], op.start_dim, op.end_dim)


def requantize(op: ir.Requantize, values, graph) -> torch.Tensor:
    v = _source_integers(op.input, values, graph)
    if op.fixed_point is not None:
        return op.fixed_point.apply(v, op.direction, op.thresholds.shape[1])
    return apply_staircase(v, op.thresholds, op.direction)


def dequantize(op: ir.Dequantize, values, graph) -> torch.Tensor:
    fmt = graph.values[op.input]
    v = _source_integers(op.input, values, graph).double()
    if isinstance(fmt, ir.CodeFormat):
        y = v * fmt.scale
    else:
        shape = [1] * v.dim()
        if fmt.scale.numel() > 1:
            shape[1] = -1
        y = v * fmt.scale.reshape(shape) + fmt.bias.reshape(shape)
    return y.clamp(op.low, op.high).float()


def integer_op_runners() -> dict[type, object]:
    return {ir.Quantize: quantize, ir.Conv: conv, ir.Linear: linear, ir.Add: add,
            ir.Concat: concat, ir.SumPool: sum_pool, ir.MaxPool: max_pool,
            ir.Reshape: reshape, ir.Requantize: requantize, ir.Dequantize: dequantize}
