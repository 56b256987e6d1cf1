"""fold-bn: fold each BatchNorm into the Conv1d, Conv2d or Linear that feeds it.

Matches a ``call_module`` BatchNorm1d/2d node whose only input is the output of a Conv1d, Conv2d
(any groups) or Linear node that nothing else uses. ``mode=eval`` (the default) rewrites the
layer's weight and bias from the running statistics (``torch.nn.utils.fusion``, in float64) and
erases the BN node, so the eval-mode model computes the same function with one layer fewer.
``mode=qat`` puts a :class:`~qcompile.fused.ConvBatchNorm` in the layer's place instead, which
trains with batch statistics and quantizes the folded weight (Jacob et al. 2018, sec. 3.2). A BN
left in place gets a note saying why; the pass also notes how many it folded.
"""

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from qcompile.errors import ConfigError
from qcompile.fused import FOLDABLE_PAIRS, ConvBatchNorm
from qcompile.ir.shapes import output_shape, propagate_shapes
from qcompile.pipeline import PassContext, register_pass

MODES = ("eval", "qat")
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@register_pass("fold-bn")
def fold_bn(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    mode = ctx.option("mode", "eval")
    if mode not in MODES:
        raise ConfigError(f"fold-bn: mode must be one of {', '.join(MODES)}, got {mode!r}")
    modules = dict(gm.named_modules())
    folded, from_training = 0, False
    for bn_node in list(gm.graph.nodes):
        if not isinstance(_module_of(bn_node, modules), BATCH_NORMS):
            continue
        reason = _reason_not_to_fold(gm, bn_node, modules, ctx)
        if reason is not None:
            ctx.note(f"kept {bn_node.target}: {reason}")
            continue
        layer_node = bn_node.args[0]
        layer, bn = modules[layer_node.target], modules[bn_node.target]
        from_training |= bn.training
        if mode == "eval":
            _fold_into(layer, bn)
        else:
            modules[layer_node.target] = ConvBatchNorm(layer, bn)
            gm.add_submodule(layer_node.target, modules[layer_node.target])
        bn_node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(bn_node)
        folded += 1
    gm.delete_all_unused_submodules()
    gm.recompile()
    ctx.note(f"folded {folded} BatchNorm layer(s) ({mode} mode)")
    if mode == "eval" and from_training:
        ctx.note("the model is in training mode; folding used the BN running statistics")
    return gm


def _module_of(node, modules: dict[str, nn.Module]) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return modules.get(node.target)
    return None


def _reason_not_to_fold(gm, bn_node: fx.Node, modules, ctx: PassContext) -> str | None:
    """Why ``bn_node`` must stay, or None when it can fold into its producer."""
    bn = modules[bn_node.target]
    if not bn.track_running_stats or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False)"
    if len(bn_node.args) != 1 or bn_node.kwargs:
        return "it is called with more than one argument"
    producer = bn_node.args[0]
    layer = _module_of(producer, modules)
    bn_type = next((b for lay, b in FOLDABLE_PAIRS if isinstance(layer, lay)), None)
    if bn_type is None:
        return f"its input '{producer}' is not the output of a Conv1d, Conv2d or Linear"
    if not isinstance(bn, bn_type):
        return f"a {type(bn).__name__} after a {type(layer).__name__} cannot fold"
    if len(producer.users) > 1:
        others = ", ".join(str(user) for user in producer.users if user is not bn_node)
        return f"the output of '{producer.target}' is also used by {others}"
    for target in (producer.target, bn_node.target):
        uses = _uses_of(gm, target)
        if uses > 1:
            return f"module '{target}' is shared: {uses} nodes call or read it"
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if channels != bn.num_features:
        return f"shape mismatch: {channels} output channels but {bn.num_features} BN features"
    if isinstance(layer, nn.Linear):
        return _reason_linear_rank(gm, producer, ctx)
    return None


def _reason_linear_rank(gm, linear_node: fx.Node, ctx: PassContext) -> str | None:
    """BatchNorm1d normalises dim 1, which is a Linear's feature dim only for 2-D outputs."""
    if output_shape(linear_node) is None and ctx.example_inputs is not None:
        propagate_shapes(gm, ctx.example_inputs)
    shape = output_shape(linear_node)
    if shape is None:
        return "the rank of the Linear output is unknown; pass example inputs to the pass manager"
    if len(shape) != 2:
        return f"shape mismatch: BatchNorm1d over a {len(shape)}-D Linear output {shape}"
    return None


def _uses_of(gm: fx.GraphModule, target: str) -> int:
    """How many nodes call module ``target`` or read one of its attributes."""
    return sum(
        (node.op == "call_module" and node.target == target)
        or (node.op == "get_attr" and node.target.startswith(target + "."))
        for node in gm.graph.nodes
    )


def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Give ``layer`` the weight and bias of ``bn(layer(x))`` under the running statistics."""
    dtype = layer.weight.dtype
    fuse = fuse_linear_bn_weights if isinstance(layer, nn.Linear) else fuse_conv_bn_weights

    def f64(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach().double()

    mean = f64(bn.running_mean)
    gamma = f64(bn.weight) if bn.weight is not None else torch.ones_like(mean)
    beta = f64(bn.bias) if bn.bias is not None else torch.zeros_like(mean)
    weight, bias = fuse(
        f64(layer.weight), f64(layer.bias), mean, f64(bn.running_var), bn.eps, gamma, beta
    )
    layer.weight = nn.Parameter(weight.detach().to(dtype))
    layer.bias = nn.Parameter(bias.detach().to(dtype))
