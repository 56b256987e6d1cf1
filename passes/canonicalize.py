"""canonicalize: one spelling per operation, so later passes match a single form.

Matches and rewrites:
- ``nn.Identity`` calls, and dropout (``nn.Dropout*`` modules in eval mode, ``F.dropout`` traced
  with ``training=False``): removed, their users read the input directly.
- ReLU in any spelling (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()``, in-place or not)
  becomes ``F.relu(x)``; ReLU6 (``nn.ReLU6``, ``F.relu6``, ``hardtanh(x, 0, 6)``) becomes
  ``F.relu6(x)``.
- Addition of two values (``+``, ``+=``, ``torch.add``, ``x.add(y)``, ``x.add_(y)``) becomes
  ``operator.add(a, b)``; flatten (``nn.Flatten``, ``x.flatten(...)``) becomes ``torch.flatten``,
  as does a ``view`` or ``reshape`` that flattens (``x.view(x.size(0), -1)``, ``x.reshape(-1,
  16 * 5 * 5)``) and keeps the batch: its first size is ``-1`` or a size read from a tensor
  (not a number, which would fix the batch), and the shapes propagated from the example inputs
  show consecutive dimensions merged after the first. The integer program and the ONNX export
  know flatten, and the sizes the view read are removed with it.
- A mean over the spatial dimensions (``x.mean((2, 3))``, ``torch.mean(x, [-2, -1],
  keepdim=True)``) becomes ``F.adaptive_avg_pool2d(x, 1)`` (1-d and 3-d alike), flattened from
  dimension 1 unless the mean keeps its dimensions: the global pooling the integer program sums.
In-place forms become out-of-place only when nothing reads the mutated tensor afterwards;
otherwise the node is kept and the pass record says why. With example inputs in ``ctx``, output
shapes are propagated onto the nodes.
"""

import math
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
        pool = _mean_as_pool(node)
        if pool is not None:
            _replace_mean(gm.graph, node, *pool)
            rewritten += 1
            continue
        form = _canonical_form(node, module)
        if form is None:
            continue
        target, args, kwargs, in_place = form
        if in_place and not _mutation_is_unread(node, order):
            ctx.note(f"kept in-place {node.name}: its input is read again after it")
            continue
        read_sizes = _shape_arguments(node) if target is torch.flatten else []
        _replace(gm.graph, node, target, args, kwargs)
        _erase_unused_sizes(gm.graph, read_sizes)
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
    flattened = _flattening_view(node, x)
    if flattened is not None:
        return torch.flatten, flattened, {}, False
    if node.op == "call_function":
        return _canonical_function(node, x)
    if node.op == "call_method":
        return _canonical_method(node, x)
    return None


_ADAPTIVE_POOLS = {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d, 5: F.adaptive_avg_pool3d}


def _mean_as_pool(node: fx.Node) -> tuple | None:
    """``(x, pool, keepdim)`` when ``node`` is a mean over every dimension after the channels of
    an (N, C, ...) tensor of 1-3 spatial dimensions (``x.mean((2, 3))``, ``torch.mean(x, [-2,
    -1], keepdim=True)``), which is adaptive average pooling to size 1, else None."""
    is_mean = (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean)
    if not is_mean or not isinstance(node.args[0] if node.args else None, fx.Node):
        return None
    x = node.args[0]
    meta = x.meta.get("tensor_meta")
    dims = _argument(node, 1, "dim", None)
    keepdim = _argument(node, 2, "keepdim", False)
    if meta is None or len(meta.shape) not in _ADAPTIVE_POOLS or dims is None or (
            set(node.kwargs) - {"dim", "keepdim"}) or not isinstance(keepdim, bool):
        return None
    rank = len(meta.shape)
    dims = [dims] if isinstance(dims, int) else dims
    if not all(isinstance(d, int) for d in dims):
        return None
    if sorted(d % rank for d in dims) != list(range(2, rank)) or len(dims) != rank - 2:
        return None
    return x, _ADAPTIVE_POOLS[rank], keepdim


def _replace_mean(graph: fx.Graph, node: fx.Node, x: fx.Node, pool, keepdim: bool) -> None:
    """``node``, a mean over the spatial dimensions, as ``pool(x, 1)`` (then flattened from
    dimension 1 unless the mean kept its dimensions)."""
    with graph.inserting_after(node):
        new = graph.call_function(pool, (x, 1))
    if not keepdim:
        with graph.inserting_after(new):
            new = graph.call_function(torch.flatten, (new, 1))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


_VIEW_METHODS = ("view", "reshape")
_VIEW_FUNCTIONS = (torch.reshape, torch.ops.aten.view.default, torch.ops.aten.reshape.default,
                   torch.ops.aten._unsafe_view.default)
_SIZE_FUNCTIONS = (torch.ops.aten.sym_size.int, operator.getitem, getattr)


def _shape_arguments(node: fx.Node) -> list:
    """The sizes a view or reshape ``node`` asks for (``x.view(a, b)`` or ``x.view((a, b))``)."""
    sizes = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        return list(sizes[0])
    return sizes


def _flattening_view(node: fx.Node, x) -> tuple | None:
    """``(x, start, end)`` when the view or reshape ``node`` is ``torch.flatten(x, start, end)``
    for every batch size (module docstring), else None."""
    is_view = (node.op == "call_method" and node.target in _VIEW_METHODS) or (
        node.op == "call_function" and node.target in _VIEW_FUNCTIONS)
    if not is_view or not isinstance(x, fx.Node):
        return None
    sizes = _shape_arguments(node)
    if not sizes or not (sizes[0] == -1 or _is_batch_size(sizes[0])):
        return None
    if not all(isinstance(size, (int, fx.Node)) for size in sizes):
        return None
    given, wanted = (n.meta.get("tensor_meta") for n in (x, node))
    if given is None or wanted is None:
        return None
    given, wanted = tuple(given.shape), tuple(wanted.shape)
    merged = len(given) - len(wanted)
    if merged < 1 or len(wanted) < 1:
        return None
    for start in range(1, len(wanted)):
        end = start + merged
        if (given[:start] == wanted[:start] and given[end + 1:] == wanted[start + 1:]
                and math.prod(given[start:end + 1]) == wanted[start]):
            return x, start, end - len(given) if end == len(given) - 1 else end
    return None


def _is_batch_size(size) -> bool:
    """Whether ``size`` reads dimension 0 of a tensor: ``t.size(0)``, ``t.shape[0]``,
    ``t.size()[0]`` or an exported program's ``sym_size(t, 0)``."""
    if not isinstance(size, fx.Node):
        return False
    if size.op == "call_method" and size.target == "size":
        return len(size.args) == 2 and size.args[1] == 0
    if size.op != "call_function" or size.target not in _SIZE_FUNCTIONS or len(size.args) != 2:
        return False
    if size.target is torch.ops.aten.sym_size.int:
        return size.args[1] == 0
    if size.target is operator.getitem and size.args[1] == 0:
        shape = size.args[0]
        return isinstance(shape, fx.Node) and (
            (shape.op == "call_method" and shape.target == "size" and len(shape.args) == 1)
            or (shape.op == "call_function" and shape.target is getattr
                and shape.args[1] == "shape"))
    return False


def _erase_unused_sizes(graph: fx.Graph, sizes: list) -> None:
    """Remove the size reads among ``sizes`` (and the shapes they index) that nothing reads."""
    pending = [size for size in sizes if isinstance(size, fx.Node)]
    while pending:
        size = pending.pop()
        reads_size = (size.op == "call_method" and size.target == "size") or (
            size.op == "call_function" and size.target in _SIZE_FUNCTIONS)
        if reads_size and not size.users:
            pending += [a for a in size.args if isinstance(a, fx.Node) and a.op != "placeholder"]
            graph.erase_node(size)


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
