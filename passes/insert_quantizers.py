"""insert-quantizers: give every quantizable layer a weight quantizer and a quantized input.

Matches each call of a Conv1d/Conv2d (depthwise included) or Linear, plain or fused with its
batch norm by ``fold-bn{mode=qat}``. A plain layer becomes a :class:`QuantizedLayer` holding a
weight quantizer; a fused conv-BN gets its ``weight_quantizer`` set, so the folded weight is what
is quantized. Each layer's input gets an activation quantizer node, shared by every layer that
reads the same tensor at the same bit-width. Bits come from ``node.meta["quant"]`` as written by
``assign-bits`` (else the uniform policy: ``bits``, first and last layer ``first_last_bits``);
``method`` and ``per_channel`` come from the pipeline configuration; ``first_last_method``
quantizes the first and last layer, weights and input, with another method: their 8 bits are a
deployment choice rather than part of a method. Unset, an edge layer of more than
``WIDE_EDGE_BITS`` bits takes the method's ``wide_edges`` method if it names one (Quantization
Networks: LSQ; see :mod:`qcompile.quant.qn`), else ``method``.

Initialisation follows each method's paper through its quantizer's ``initialize``: weight
quantizers from the float weights, activation quantizers from the activations that calibration
batches (``calib_data``, else the example inputs) produce in the float model. An input that is
negative anywhere in calibration gets a signed quantizer; a method without signed activations
falls back to LSQ for that input, and the pass record says so.
"""

import torch
from torch import fx, nn

from qcompile.fused import ConvBatchNorm
from qcompile.pipeline import PassContext, register_pass
from qcompile.quant.calibration import (
    CALIB_EXAMPLES,
    INPUT_QUANTIZERS,
    batches_for,
    calibrated_activation_quantizer,
    record_inputs,
    set_submodule,
)
from qcompile.quant.layers import LayerSite, float_weight, quantizable_layers
from qcompile.quant.quantized_layer import QuantizedLayer
from qcompile.quant.registry import WIDE_EDGE_BITS, get_method, make_quantizer

CONTAINER = INPUT_QUANTIZERS


@register_pass("insert-quantizers")
def insert_quantizers(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    method = get_method(ctx.option("method", "qil")).name
    per_channel = bool(ctx.option("per_channel", True))
    sites = quantizable_layers(gm)
    if not sites:
        ctx.note("no quantizable layers")
        return gm
    _default_bits(sites, ctx)
    edges = _edge_methods(sites, method, ctx)
    methods = {site.name: edges.get(index, method) for index, site in enumerate(sites)}
    for site in sites:
        _quantize_weight(gm, site, methods[site.name], per_channel)
    inputs = _insert_input_nodes(gm, sites, methods)
    gm.recompile()
    _calibrate_inputs(gm, inputs, ctx)
    gm.graph.lint()
    gm.recompile()
    ctx.note(f"{method}: {len(sites)} layers{_edges_note(edges, method)}, "
             f"{len(inputs)} input quantizers")
    return gm


def _edge_methods(sites: list[LayerSite], method: str, ctx: PassContext) -> dict[int, str]:
    """The methods of the first and last layer, by index: ``first_last_method`` when given, else
    the method's ``wide_edges`` for an edge wider than ``WIDE_EDGE_BITS``, else ``method``."""
    last = len(sites) - 1
    chosen = ctx.option("first_last_method")
    if chosen:
        return dict.fromkeys((0, last), get_method(chosen).name)
    wide = get_method(method).wide_edges
    edges = {}
    for index in (0, last):
        quant = sites[index].node.meta["quant"]
        bits = max(quant["weight_bits"], quant["act_bits"])
        edges[index] = wide if wide and bits > WIDE_EDGE_BITS else method
    return edges


def _edges_note(edges: dict[int, str], method: str) -> str:
    first, last = edges[0], edges[max(edges)]
    if first == last:
        return f" (first and last: {first})" if first != method else ""
    return f" (first: {first}, last: {last})"


def _default_bits(sites: list[LayerSite], ctx: PassContext) -> None:
    if all("weight_bits" in s.node.meta.get("quant", {}) for s in sites):
        return
    bits, edge = ctx.option("bits", 2), ctx.option("first_last_bits", 8) or ctx.option("bits", 2)
    for index, site in enumerate(sites):
        width = edge if index in (0, len(sites) - 1) else bits
        site.node.meta["quant"] = dict(site.node.meta.get("quant", {}),
                                       weight_bits=width, act_bits=width)


def _quantize_weight(gm: fx.GraphModule, site: LayerSite, method: str, per_channel: bool) -> None:
    meta = site.node.meta["quant"]
    weight = float_weight(site.module)
    quantizer = make_quantizer(method, "weight", meta["weight_bits"], signed=True,
                               per_channel=per_channel, channels=weight.shape[0], channel_axis=0)
    with torch.no_grad():
        quantizer.initialize(weight.detach())
    if isinstance(site.module, ConvBatchNorm):
        site.module.weight_quantizer = quantizer
    else:
        set_submodule(gm, site.name, QuantizedLayer(site.module, quantizer))
    meta.update(method=method, per_channel=per_channel)


def _insert_input_nodes(gm: fx.GraphModule, sites: list[LayerSite],
                        methods: dict[str, str]) -> dict[str, fx.Node]:
    """One quantizer node per (input tensor, bit-width, method); returns them by submodule
    name."""
    gm.add_module(CONTAINER, nn.Module())
    made: dict[tuple[fx.Node, int, str], fx.Node] = {}
    for site in sites:
        source, bits = site.node.args[0], site.node.meta["quant"]["act_bits"]
        key = (source, bits, methods[site.name])
        if key not in made:
            name = f"{site.name.replace('.', '_')}_input"
            gm.get_submodule(CONTAINER).add_module(name, nn.Identity())
            with gm.graph.inserting_after(source):
                made[key] = gm.graph.call_module(f"{CONTAINER}.{name}", (source,))
            made[key].meta["quant_input"] = {"bits": bits, "method": key[2], "layers": []}
        node = made[key]
        node.meta["quant_input"]["layers"].append(site.name)
        site.node.replace_input_with(source, node)
    return {node.target: node for node in made.values()}


def _calibrate_inputs(gm, inputs: dict[str, fx.Node], ctx: PassContext) -> None:
    examples = int(ctx.option("calib_examples", CALIB_EXAMPLES))
    batches = batches_for(ctx, examples, "activation calibration")
    seen = record_inputs(gm, list(inputs), batches)
    for name, node in inputs.items():
        bits, method = node.meta["quant_input"]["bits"], node.meta["quant_input"]["method"]
        quantizer, fell_back = calibrated_activation_quantizer(method, bits, seen[name])
        if fell_back:
            ctx.note(f"{name}: {method} has no signed activations; LSQ quantizes this input")
        set_submodule(gm, name, quantizer)
        node.meta["quant_input"].update(method=quantizer.method, signed=quantizer.signed)


