"""canonicalize: one spelling per operation, so later passes match a single form.

Matches and rewrites:
- ``nn.Identity`` calls, and dropout (``nn.Dropout*`` modules in eval mode, ``F.dropout`` traced
  with ``training=False``): removed, their users read the input directly.
- ReLU in any spelling (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()``, in-place or not)
  becomes ``F.relu(x)``; ReLU6 (``nn.ReLU6``, ``F.relu6``, ``hardtanh(x, 0, 6)``) becomes
  ``F.relu6(x)``.
- Addition of two values (``+``, ``+=``, ``torch.add``, ``x.add(y)``, ``x.add_(y)``) becomes
  ``operator.add(a, b)``; flatten (``nn.Flatten``, ``x.flatten(...)``) becomes ``torch.flatten``.
In-place forms become out-of-place only when nothing reads the mutated tensor afterwards;
otherwise the node is kept and the pass record says why. With example inputs in ``ctx``, output
shapes are propagated onto the nodes.
"""

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qcompile.ir.shapes import propagate_shapes
from qcompile.pipeline import PassContext, register_pass

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

_RELU_FUNCTIONS = {torch.relu: False, F.relu: None, torch.relu_: True, F.relu_: True}
_ADD_FUNCTIONS = {operator.add: False, torch.add: False, operator.iadd: True}


@register_pass("canonicalize")
def canonicalize(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    modules = dict(gm.named_modules())
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    removed = rewritten = 0
    for node in list(gm.graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        if _is_removable(node, module):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
            continue
        form = _canonical_form(node, module)
        if form is None:
            continue
        target, args, kwargs, in_place = form
        if in_place and not _mutation_is_unread(node, order):
            ctx.note(f"kept in-place {node.name}: its input is read again after it")
            continue
        _replace(gm.graph, node, target, args, kwargs)
        rewritten += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    ctx.note(f"removed {removed} identity/dropout, rewrote {rewritten} ops to canonical form")
    if gm.training and any(isinstance(m, _DROPOUT) for m in gm.modules()):
        ctx.note("model is in training mode: dropout kept")
    if ctx.example_inputs is not None:
        propagate_shapes(gm, ctx.example_inputs)
    return gm


def _is_removable(node: fx.Node, module: nn.Module | None) -> bool:
    if isinstance(module, nn.Identity):
        return True
    if isinstance(module, _DROPOUT):
        return not module.training
    if node.op == "call_function" and node.target is F.dropout:
        return not _argument(node, 2, "training", True)
    return False


def _canonical_form(node: fx.Node, module: nn.Module | None):
    """(target, args, kwargs, in_place) of the canonical op for ``node``, or None."""
    x = node.args[0] if node.args else None
    if isinstance(module, nn.ReLU):
        return F.relu, (x,), {}, module.inplace
    if isinstance(module, nn.ReLU6) or (isinstance(module, nn.Hardtanh) and _is_relu6(module)):
        return F.relu6, (x,), {}, module.inplace
    if isinstance(module, nn.Flatten):
        return torch.flatten, (x, module.start_dim, module.end_dim), {}, False
    if node.op == "call_function":
        return _canonical_function(node, x)
    if node.op == "call_method":
        return _canonical_method(node, x)
    return None


def _canonical_function(node: fx.Node, x):
    target = node.target
    if target in _RELU_FUNCTIONS:
        in_place = _RELU_FUNCTIONS[target]
        if in_place is None:
            in_place = bool(_argument(node, 1, "inplace", False))
        return None if target is F.relu and not in_place else (F.relu, (x,), {}, in_place)
    if target is F.relu6 and _argument(node, 1, "inplace", False):
        return F.relu6, (x,), {}, True
    if target is F.hardtanh and _argument(node, 1, "min_val", -1.0) == 0 and _argument(
        node, 2, "max_val", 1.0
    ) == 6:
        return F.relu6, (x,), {}, bool(_argument(node, 3, "inplace", False))
    if target in _ADD_FUNCTIONS and _plain_add(node):
        if target is operator.add:
            return None
        return operator.add, tuple(node.args[:2]), {}, _ADD_FUNCTIONS[target]
    return None


def _canonical_method(node: fx.Node, x):
    if node.target in ("relu", "relu_"):
        return F.relu, (x,), {}, node.target == "relu_"
    if node.target in ("add", "add_") and _plain_add(node):
        return operator.add, tuple(node.args[:2]), {}, node.target == "add_"
    if node.target == "flatten":
        start = _argument(node, 1, "start_dim", 0)
        end = _argument(node, 2, "end_dim", -1)
        return torch.flatten, (x, start, end), {}, False
    return None


def _plain_add(node: fx.Node) -> bool:
    """An add of exactly two values, with no ``alpha`` or ``out``."""
    return len(node.args) == 2 and not node.kwargs and isinstance(node.args[0], fx.Node)


def _is_relu6(module: nn.Hardtanh) -> bool:
    return module.min_val == 0.0 and module.max_val == 6.0


def _argument(node: fx.Node, position: int, name: str, default):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _mutation_is_unread(node: fx.Node, order: dict[fx.Node, int]) -> bool:
    """True when no node after ``node`` reads the tensor ``node`` mutates in place."""
    mutated = node.args[0]
    if not isinstance(mutated, fx.Node):
        return False
    return all(order.get(user, -1) <= order[node] for user in mutated.users if user is not node)


def _replace(graph: fx.Graph, node: fx.Node, target, args, kwargs) -> None:
    with graph.inserting_after(node):
        new = graph.call_function(target, args, kwargs)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
