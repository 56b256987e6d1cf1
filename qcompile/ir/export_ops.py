"""ATen ops the export frontend turns into the torch functions our passes match.

An exported graph spells ReLU as ``aten.relu_.default`` and a residual add as
``aten.add_.Tensor``; the passes look for ``F.relu`` and ``operator.add``. An in-place op becomes
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


def make_out_of_place(node: fx.Node) -> None:
    """Give ``node`` the out-of-place torch function of its ATen op, where that is safe."""
    function = OUT_OF_PLACE.get(node.target) if node.op == "call_function" else None
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
    return target in set(OUT_OF_PLACE.values())
