"""The fx frontend: trace an ``nn.Module`` into the IR, a ``torch.fx.GraphModule``.

The tracer keeps the layers we quantize (Conv1d/2d, Linear, and any type or module path the user
names) as ``call_module`` leaves, so passes see a layer as one node. A model fx cannot trace
raises :class:`~qcompile.errors.TraceError` naming the module path and the source line that
stopped it, and what to do about it.
"""

import os
import re
import traceback
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from qcompile.errors import InputError, TraceError
from qcompile.ir.shapes import propagate_shapes

QUANTIZABLE_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
"""Layer types qcompile quantizes; the tracer always keeps them whole."""

_extra_leaf_types: list[type[nn.Module]] = []

_TORCH_DIR = os.path.dirname(torch.__file__)
_QCOMPILE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def register_leaf_type(module_type: type[nn.Module]) -> type[nn.Module]:
    """Make every trace keep ``module_type`` whole (usable as a class decorator).

    qcompile's own layers (fused conv-BN, quantized layers) register themselves, so a graph that
    holds them can be traced again.
    """
    if module_type not in _extra_leaf_types:
        _extra_leaf_types.append(module_type)
    return module_type


class QcompileTracer(fx.Tracer):
    """An fx tracer whose leaves are the quantizable layers plus user-named types or paths."""

    def __init__(self, leaf_modules: Iterable[type[nn.Module] | str] = ()):
        super().__init__()
        leaves = list(leaf_modules)
        self.leaf_types = QUANTIZABLE_LAYERS + tuple(_extra_leaf_types) + tuple(
            leaf for leaf in leaves if isinstance(leaf, type)
        )
        self.leaf_paths = {leaf for leaf in leaves if isinstance(leaf, str)}
        self.failed_module_path: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_paths:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module_path is None:
                self.failed_module_path = self.path_of_module(m)
            raise


def trace(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | None = None,
    *,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    concrete_args: dict | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule; the model itself is copied, never modified.

    With ``example_inputs`` the graph's nodes also carry their output shapes
    (``node.meta["tensor_meta"]``). ``leaf_modules`` names extra module types or qualified
    module paths to keep whole; ``concrete_args`` fixes inputs that drive Python control flow.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"qcompile.trace needs an nn.Module, got {type(model).__name__}")
    model = _copy_model(model)
    tracer = QcompileTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as error:
        raise _trace_error(error, tracer.failed_module_path, type(model).__name__) from error
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    gm.train(model.training)
    if example_inputs is not None:
        inputs = example_tuple(example_inputs)
        _check_input_count(gm, inputs)
        try:
            propagate_shapes(gm, inputs)
        except Exception as error:
            raise _input_error(error, gm, inputs) from error
    return gm


def example_tuple(example_inputs) -> tuple:
    """``example_inputs`` as the tuple of the model's inputs: one tensor (or NumPy array) is the
    only input, as a tensor would otherwise be unpacked along its batch dimension; NumPy arrays
    become tensors, floating-point ones of torch's default dtype (NumPy makes float64)."""
    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    return tuple(from_numpy(value) for value in example_inputs)


def from_numpy(value):
    """A NumPy array as a tensor, floating-point ones of torch's default dtype (NumPy's float64
    would not meet a float32 model); anything else as it is."""
    if not isinstance(value, np.ndarray):
        return value
    tensor = torch.as_tensor(value)
    return tensor.to(torch.get_default_dtype()) if tensor.is_floating_point() else tensor


def _check_input_count(gm: fx.GraphModule, inputs: tuple) -> None:
    """fx runs a graph on too many inputs by dropping the rest: say so instead."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    required = [node for node in placeholders if not node.args]  # args hold a default
    if not len(required) <= len(inputs) <= len(placeholders):
        names = ", ".join(node.target for node in placeholders)
        takes = (f"{len(placeholders)}" if len(required) == len(placeholders)
                 else f"{len(required)} to {len(placeholders)}")
        raise InputError(f"{gm.__class__.__name__} takes {takes} input(s) ({names}); got "
                         f"{len(inputs)} example inputs")


def _input_error(error: Exception, gm: fx.GraphModule, inputs: tuple) -> InputError:
    """The model failed on its example inputs: where (ShapeProp names the node) and why."""
    cause = error.__cause__ or error
    found = re.search(r"node=%(\w+)", str(error)) if cause is not error else None
    node = next((n for n in gm.graph.nodes if found and n.name == found.group(1)), None)
    where = ""
    if node is not None and node.op == "call_module":
        where = f" at '{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    elif node is not None:
        where = f" at {node.op} {getattr(node.target, '__name__', node.target)}"
    shapes = ", ".join("x".join(map(str, v.shape)) if isinstance(v, torch.Tensor)
                       else type(v).__name__ for v in inputs)
    return InputError(f"{gm.__class__.__name__} does not run on its example inputs ({shapes})"
                      f"{where}: {type(cause).__name__}: {_first_line(cause)}")


def _copy_model(model: nn.Module) -> nn.Module:
    import copy

    try:
        return copy.deepcopy(model)
    except Exception as error:
        raise TraceError(
            f"cannot copy {type(model).__name__} before tracing ({error}); qcompile never edits "
            "the caller's model in place, so the model must support copy.deepcopy"
        ) from error


def _trace_error(error: Exception, module_path: str | None, model_name: str) -> TraceError:
    where = f"module '{module_path}'" if module_path else f"the forward of {model_name}"
    line = _user_source_line(error)
    at = f" at {line}" if line else ""
    return TraceError(
        f"cannot trace {where}{at}: {type(error).__name__}: {_first_line(error)}. "
        "fx records tensor operations only, so Python control flow or conversions that depend on "
        "tensor values cannot be traced. Mark that module as a leaf "
        "(qcompile.trace(..., leaf_modules=[TheModule]) or CLI --leaf TheModule), pass concrete_args "
        "to fix the input that drives it, or rewrite the line with tensor ops such as torch.where"
    )


def _user_source_line(error: Exception) -> str | None:
    """The innermost frame of the traceback that is the model's own code: 'file:line ("code")'."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        filename = os.path.abspath(frame.filename)
        if filename.startswith((_TORCH_DIR, _QCOMPILE_DIR)) or frame.filename.startswith("<"):
            continue
        code = (frame.line or "").strip()
        return f'{frame.filename}:{frame.lineno} ("{code}")'

    return None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"
