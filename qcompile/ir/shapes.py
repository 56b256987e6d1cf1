"""Shape propagation and the run check the pass manager does after every pass."""

import contextlib
import io
import sys
from collections.abc import Iterator, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp


@contextlib.contextmanager
def inference_mode_of(module: torch.nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode without autograd, then restore each submodule's own mode.

    Checking a graph must not change it: a training-mode forward would update batch-norm
    running statistics.
    """
    modes = {name: sub.training for name, sub in module.named_modules()}
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for name, sub in module.named_modules():
            if name in modes:
                sub.training = modes[name]


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Run ``gm`` on ``example_inputs``, recording each node's output in ``node.meta``.

    Sets ``node.meta["tensor_meta"]`` (torch's own ShapeProp). Raises whatever the model raises;
    ShapeProp also prints that error's traceback to stderr, which is dropped: the caller reports
    the error (what else the run writes to stderr, warnings say, passes through).
    """
    held = io.StringIO()
    with inference_mode_of(gm), contextlib.redirect_stderr(held):
        ShapeProp(gm).propagate(*example_inputs)
    sys.stderr.write(held.getvalue())


def output_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The output shape recorded by :func:`propagate_shapes`, or None for non-tensor outputs."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None
