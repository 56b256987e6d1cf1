"""A user's own pass, registered by name so ``--plugin plugins.user_passes`` can run it."""

import torch
import torch.fx as fx
import torch.nn.functional as F

import qcompile

_RELUS = (torch.relu, F.relu)


@qcompile.register_pass("relu-to-leaky")
def relu_to_leaky(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """Replace every functional ReLU by a leaky ReLU with slope ``{slope=...}`` (default 0.1)."""
    slope = float(ctx.option("slope", 0.1))
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _RELUS:
            node.target = F.leaky_relu
            node.args = (node.args[0], slope)
            node.kwargs = {}
            count += 1
    ctx.note(f"{count} relu -> leaky_relu({slope})")
    return gm


def halve(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5


@qcompile.register_pass("call-plugin-function")
def call_plugin_function(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """Scale the output by a function of this module (code to_folder cannot write out)."""
    output = next(node for node in gm.graph.nodes if node.op == "output")
    with gm.graph.inserting_before(output):
        scaled = gm.graph.call_function(halve, (output.args[0],))
    output.args = (scaled,)
    return gm
