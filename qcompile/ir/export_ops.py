"""ATen ops the export frontend turns into the torch functions our passes match.

An exported graph spells ReLU as ``aten.relu_.default``, a residual add as ``aten.add_.Tensor``
and a max pool as ``aten.max_pool2d.default``; the passes, the integer program and the ONNX
export look for ``F.relu``, ``operator.add`` and ``F.max_pool2d``. An in-place op becomes
out-of-place only when nothing else can see the mutation: the tensor it writes is a fresh value
(not a view or an input) that no other node reads.
"""

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten

OUT_OF_PLACE: dict[Any, Callable] = {
    aten.relu.default: F.relu,
    aten.relu_.default: F.relu,
    aten.relu6.default: F.relu6,
    aten.hardtanh.default: F.hardtanh,
    aten.hardtanh_.default: F.hardtanh,
    aten.sigmoid.default: torch.sigmoid,
    aten.sigmoid_.default: torch.sigmoid,
    aten.silu.default: F.silu,
    aten.silu_.default: F.silu,
    aten.hardswish.default: F.hardswish,
    aten.hardswish_.default: F.hardswish,
    aten.dropout.default: F.dropout,
    aten.dropout_.default: F.dropout,
    aten.add.Tensor: operator.add,
    aten.add_.Tensor: operator.add,
    aten.sub.Tensor: operator.sub,
    aten.sub_.Tensor: operator.sub,
    aten.mul.Tensor: operator.mul,
    aten.mul_.Tensor: operator.mul,
}
"""ATen ops (in-place or not) and the out-of-place torch function with the same arguments."""

STRUCTURAL: dict[Any, Callable] = {
    aten.max_pool1d.default: F.max_pool1d,
    aten.max_pool2d.default: F.max_pool2d,
    aten.max_pool3d.default: F.max_pool3d,
    aten.avg_pool1d.default: F.avg_pool1d,
    aten.avg_pool2d.default: F.avg_pool2d,
    aten.avg_pool3d.default: F.avg_pool3d,
    aten.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.adaptive_avg_pool3d.default: F.adaptive_avg_pool3d,
    aten.flatten.using_ints: torch.flatten,
    aten.cat.default: torch.cat,
    aten.mean.dim: torch.mean,
}
"""The pools, flatten and concatenation the integer program, the ONNX export and
``quantize-boundaries`` know, and the mean ``canonicalize`` makes a pool of, each with the torch
function of the same arguments (an empty ``stride``, the ATen default, means the kernel size to
each of them)."""

FRESH = (set(OUT_OF_PLACE.values()) | set(STRUCTURAL.values())) - {torch.flatten}
"""The torch functions above whose result is a new tensor (``torch.flatten`` may return a view
of its input)."""


def make_out_of_place(node: fx.Node) -> None:
    """Give ``node`` the out-of-place torch function of its ATen op, where that is safe."""
    function = None
    if node.op == "call_function":
        function = OUT_OF_PLACE.get(node.target) or STRUCTURAL.get(node.target)
    if function is None or node.kwargs.get("alpha", 1) != 1:
        return
    if node.target._schema.is_mutable and not _mutation_unobserved(node):
        return
    node.target = function
    node.kwargs = {key: value for key, value in node.kwargs.items() if key != "alpha"}


def _mutation_unobserved(node: fx.Node) -> bool:
    """True if the tensor ``node`` mutates is a fresh value only ``node`` reads."""
    mutated = node.args[0]
    if not isinstance(mutated, fx.Node) or len(mutated.users) != 1:
        return False
    if mutated.op == "call_module":
        return True
    if mutated.op != "call_function":
        return False
    target = mutated.target
    if isinstance(target, torch._ops.OpOverload):
        return all(ret.alias_info is None for ret in target._schema.returns)
    return target in FRESH
