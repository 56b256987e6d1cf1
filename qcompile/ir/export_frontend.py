"""The torch.export frontend: turn an ``ExportedProgram`` into the same IR fx tracing gives.

``ep.module()`` is a GraphModule of ATen ops whose weights are ``get_attr`` nodes with the
original qualified names (``layer1.0.conv1.weight``). Our passes match *modules*, so this
frontend raises each ATen convolution, linear and batch-norm call whose parameters are such
``get_attr`` nodes back into an ``nn.Conv1d/Conv2d/Linear/BatchNorm*d`` at its original module
path, called as a ``call_module`` node. In-place ATen ops from a small table become out-of-place
torch functions (``aten.relu_`` -> ``F.relu``, ``aten.add_.Tensor`` -> ``operator.add``) when
nothing else can observe the mutation, and pools, flatten and concatenation become their torch
functions (``aten.max_pool2d`` -> ``F.max_pool2d``); every other ATen op is left as it is.

A program exported for one batch size spells ``x.view(x.size(0), -1)`` as ``view(x, [1, -1])``;
the IR runs at any batch (calibration and training batches), so where a view or reshape asks for
the exported batch as its first size, on a tensor whose dimension 0 is that batch, the size is
read from the tensor instead (``aten.sym_size.int(x, 0)``, as a program exported with a dynamic
batch has it). ``canonicalize`` then sees a flatten.

Only eval-mode batch norm (``training=False``) is raised: a training-mode call also updates
running statistics, which the exported graph spells out with its own ops.
"""

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.operator_schemas import normalize_function

from qcompile.errors import ModelLoadError
from qcompile.ir.export_ops import make_out_of_place

aten = torch.ops.aten

_CONV_OPS = (
    aten.conv1d.default,
    aten.conv1d.padding,
    aten.conv2d.default,
    aten.conv2d.padding,
    aten.convolution.default,
)
_BATCH_NORM_OPS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
_CONV_TYPES = {3: nn.Conv1d, 4: nn.Conv2d}
_BATCH_NORM_TYPES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}

_GUARD_MODULE = "_guards_fn"
"""The input-guard submodule ``ep.module()`` calls first; the IR has fixed shapes and drops it."""

_FOREIGN = object()
"""An argument that is not the layer's own ``<path>.<name>`` tensor, so the call stays ATen."""

_KEPT_META = ("tensor_meta", "stack_trace", "nn_module_stack")


def from_exported_program(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """A GraphModule computing what ``ep.module()`` computes, with layers raised to modules.

    The program's inputs must be positional tensors (no nested structures); its outputs keep
    their structure (a tensor, a tuple, a dict...).
    """
    source = ep.module()
    graph = fx.Graph()
    placeholders = [n for n in source.graph.nodes if n.op == "placeholder"]
    if ep.call_spec.in_spec != pytree.tree_structure((tuple(placeholders), {})):
        raise ModelLoadError(
            "the exported program takes nested or keyword inputs; qcompile compiles programs "
            "whose inputs are positional tensors, so export the model with a flat tuple of tensors"
        )
    flat_outputs = graph.graph_copy(source.graph, {})
    graph.output(pytree.tree_unflatten(list(flat_outputs), ep.call_spec.out_spec))
    for node in graph.nodes:
        if node.op == "call_module" and node.target == _GUARD_MODULE and not node.users:
            graph.erase_node(node)
    _read_batch_sizes(graph, placeholders)

    root = nn.Module()
    raised = _LayerRaiser(source, root)
    for node in list(graph.nodes):
        raised.visit(graph, node)
    for node in list(graph.nodes):
        make_out_of_place(node)
    for node in reversed(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
        else:
            node.meta = {key: node.meta[key] for key in _KEPT_META if key in node.meta}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            _copy_attribute(source, root, node.target)
    gm = fx.GraphModule(root, graph, class_name=type(source).__name__)
    return gm.eval()


_VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _read_batch_sizes(graph: fx.Graph, inputs: list[fx.Node]) -> None:
    """Views and reshapes of a program with one input of a fixed batch size read that size from
    the tensor they view (module docstring)."""
    shapes = [getattr(node.meta.get("val"), "shape", None) for node in inputs]
    if len(shapes) != 1 or not shapes[0] or type(shapes[0][0]) is not int:
        return
    batch = shapes[0][0]
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _VIEW_OPS or len(node.args) < 2:
            continue
        tensor, sizes = node.args[0], node.args[1]
        shape = getattr(tensor.meta.get("val"), "shape", None) if isinstance(
            tensor, fx.Node) else None
        if not sizes or type(sizes[0]) is not int or sizes[0] != batch or not shape or (
                shape[0] != batch):
            continue
        with graph.inserting_before(node):
            size = graph.call_function(aten.sym_size.int, (tensor, 0))
        node.args = (tensor, [size, *sizes[1:]], *node.args[2:])


class _LayerRaiser:
    """Replaces ATen conv/linear/batch-norm calls by modules installed at their original paths."""

    def __init__(self, source: nn.Module, root: nn.Module):
        self.source = source
        self.root = root
        self.installed: dict[str, nn.Module] = {}

    def visit(self, graph: fx.Graph, node: fx.Node) -> None:
        if node.op != "call_function":
            return
        if node.target in _CONV_OPS:
            self._raise(graph, node, self._conv(node), node)
        elif node.target == aten.linear.default:
            self._raise(graph, node, self._linear(node), node)
        elif node.target == aten.batch_norm.default:
            self._raise(graph, node, self._batch_norm(node), node)
        elif node.target == aten._native_batch_norm_legit_no_training.default:
            getters = list(node.users)
            if getters and all(u.target is operator.getitem and u.args[1] == 0 for u in getters):
                layer = self._batch_norm(node)
                for getter in getters:
                    self._raise(graph, getter, layer, node)

    def _raise(self, graph: fx.Graph, node: fx.Node, layer, call: fx.Node) -> None:
        if layer is None:
            return
        path, module = layer
        known = self.installed.get(path)
        if known is None:
            _install(self.root, path, module)
            self.installed[path] = module
        elif not _same_layer(known, module):
            return
        with graph.inserting_before(node):
            raised = graph.call_module(path, (call.args[0],))
        raised.meta = dict(node.meta)
        node.replace_all_uses_with(raised)
        graph.erase_node(node)
        if call is not node and not call.users:
            graph.erase_node(call)

    def _conv(self, node: fx.Node):
        args = _arguments(node)
        weight = self._tensor(args["weight"])
        path = _owner(args["weight"], "weight")
        if weight is None or path is None or weight.dim() not in _CONV_TYPES:
            return None
        if args.get("transposed") or any(args.get("output_padding", ())):
            return None
        bias = self._parameter_of(path, "bias", args["bias"])
        if bias is _FOREIGN:
            return None
        conv = _CONV_TYPES[weight.dim()](
            weight.shape[1] * args["groups"],
            weight.shape[0],
            tuple(weight.shape[2:]),
            stride=_tuple(args["stride"]),
            padding=_tuple(args["padding"]),
            dilation=_tuple(args["dilation"]),
            groups=args["groups"],
            bias=bias is not None,
        )
        return path, _with_tensors(conv, weight=weight, bias=bias)

    def _linear(self, node: fx.Node):
        args = _arguments(node)
        weight = self._tensor(args["weight"])
        path = _owner(args["weight"], "weight")
        if weight is None or path is None or weight.dim() != 2:
            return None
        bias = self._parameter_of(path, "bias", args["bias"])
        if bias is _FOREIGN:
            return None
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        return path, _with_tensors(linear, weight=weight, bias=bias)

    def _batch_norm(self, node: fx.Node):
        args = _arguments(node)
        if args.get("training", False) or args["running_mean"] is None:
            return None
        path = _owner(args["running_mean"], "running_mean")
        rank = _rank(args["input"])
        if path is None or rank not in _BATCH_NORM_TYPES:
            return None
        mean = self._tensor(args["running_mean"])
        var = self._parameter_of(path, "running_var", args["running_var"])
        weight = self._parameter_of(path, "weight", args["weight"])
        bias = self._parameter_of(path, "bias", args["bias"])
        foreign = any(value is _FOREIGN for value in (var, weight, bias))
        if foreign or var is None or (weight is None) != (bias is None):
            return None
        norm = _BATCH_NORM_TYPES[rank](
            mean.shape[0], eps=args["eps"], momentum=args["momentum"], affine=weight is not None
        )
        norm.running_mean = mean
        norm.running_var = var
        counter = _fetch(self.source, f"{path}.num_batches_tracked")
        if isinstance(counter, torch.Tensor):
            norm.num_batches_tracked = counter
        return path, _with_tensors(norm.eval(), weight=weight, bias=bias)

    def _tensor(self, arg) -> torch.Tensor | None:
        if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
            return None
        value = _fetch(self.source, arg.target)
        return value if isinstance(value, torch.Tensor) else None

    def _parameter_of(self, path: str, name: str, arg):
        """The tensor ``arg`` reads if it is ``<path>.<name>``, None if absent, else _FOREIGN."""
        if arg is None:
            return None
        value = self._tensor(arg) if _owner(arg, name) == path else None
        return _FOREIGN if value is None else value


def _arguments(node: fx.Node) -> dict[str, Any]:
    normalized = normalize_function(
        node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
    )
    return dict(normalized.kwargs)


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def _owner(arg, name: str) -> str | None:
    """``"layer1.0.conv1"`` for a get_attr of ``"layer1.0.conv1.<name>"``, else None."""
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    path, _, leaf = str(arg.target).rpartition(".")
    return path if path and leaf == name else None


def _rank(arg) -> int | None:
    """The rank of the tensor ``arg`` holds, from export's ``val`` or fx's ``tensor_meta``."""
    if not isinstance(arg, fx.Node):
        return None
    for key in ("val", "tensor_meta"):
        shape = getattr(arg.meta.get(key), "shape", None)
        if shape is not None:
            return len(shape)
    return None


def _with_tensors(module: nn.Module, **tensors: torch.Tensor | None) -> nn.Module:
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor.detach(), requires_grad=tensor.is_floating_point())
        setattr(module, name, tensor)
    return module


def _same_layer(first: nn.Module, second: nn.Module) -> bool:
    """Two raised calls may share one module only if they describe the very same layer."""
    if type(first) is not type(second) or first.extra_repr() != second.extra_repr():
        return False
    mine, theirs = first.state_dict(keep_vars=True), second.state_dict(keep_vars=True)
    return mine.keys() == theirs.keys() and all(mine[k] is theirs[k] for k in mine)


def _fetch(module: nn.Module, target: str) -> Any:
    try:
        return operator.attrgetter(target)(module)
    except AttributeError:
        return None


def _copy_attribute(source: nn.Module, root: nn.Module, target: str) -> None:
    """Make ``root.<target>`` the object ``source.<target>`` is, unless root already has one."""
    if _fetch(root, target) is not None:
        return
    value = _fetch(source, target)
    if value is None:
        raise ModelLoadError(f"the exported program reads '{target}', which it does not hold")
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        path, _, name = target.rpartition(".")
        parent = _container(root, path)
        parent.register_buffer(name, value)
    else:
        _install(root, target, value)


def _install(root: nn.Module, path: str, value: Any) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(_container(root, parent_path), name, value)


def _container(root: nn.Module, path: str) -> nn.Module:
    module = root
    for name in filter(None, path.split(".")):
        child = getattr(module, name, None)
        if child is None:
            child = nn.Module()
            setattr(module, name, child)
        module = child
    return module
