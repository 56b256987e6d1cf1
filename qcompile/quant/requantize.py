"""Change the bit-width of quantized layers in place, keeping their trained float weights.

Progressive quantization (Zhuang et al., "Towards Effective Low-bitwidth Convolutional Neural
Networks", CVPR 2018) lowers the bit-width during training, each stage starting from the network
the previous stage trained. :func:`requantize` is that switch for a graph made by
``insert-quantizers``: a layer given a new bit-width gets a new weight quantizer of the same
method, initialized from its current (latent) float weight, and its input gets a new activation
quantizer initialized from calibration activations, exactly as ``insert-quantizers`` does it. The
layer's float weights, biases and batch-norm statistics are left untouched.

Layer inputs stay shared per (tensor, bit-width, method), as ``insert-quantizers`` makes them:
layers that read one tensor and end up at different bit-widths (or are of different methods) get
separate input quantizers, and layers that end up at one bit-width and method share one; an input
quantizer left without readers is removed.
"""

from collections.abc import Callable, Iterable

import torch
from torch import fx, nn

from qcompile.errors import ConfigError
from qcompile.quant.base import Quantizer
from qcompile.quant.calibration import (
    BOUNDARY_QUANTIZERS,
    CALIB_EXAMPLES,
    INPUT_QUANTIZERS,
    activation_quantizer,
    calibrated_activation_quantizer,
    calibration_batches,
    record_inputs,
    set_submodule,
)
from qcompile.quant.layers import LayerSite, float_weight, quantizable_layers
from qcompile.quant.registry import make_quantizer

BitsForLayer = dict[str, int] | Callable[[str], int | None]


def requantize(
    gm: fx.GraphModule,
    bits_for_layer: BitsForLayer,
    calib_data: Iterable | None = None,
    calib_examples: int = CALIB_EXAMPLES,
) -> list[str]:
    """Give the quantized layers of ``gm`` new weight and activation bit-widths, in place.

    ``bits_for_layer`` maps a layer's module path to its new bit-width (weights and input alike);
    a layer missing from the dict, or for which the callable returns None, keeps its bits. New
    activation quantizers are initialized from the inputs ``calib_data`` (tuples of model inputs,
    up to ``calib_examples`` examples) produces with every input quantizer bypassed, i.e. the
    float activations of the current quantized weights, as at insertion. With ``calib_data=None``
    they are only built (same method and signedness as before) with default parameters: for a
    model whose saved state dict is loaded next. The quantizers keep the ``enabled``, ``hard`` and
    training flags (and a temperature) of the ones they replace. Updates ``node.meta["quant"]``
    and ``node.meta["quant_input"]``; returns the paths of the layers whose bits changed.
    """
    sites = [s for s in quantizable_layers(gm) if _is_quantized(s)]
    widths = _changes(sites, bits_for_layer)
    if not widths:
        return []
    for site in sites:
        if site.name in widths:
            _new_weight_quantizer(site, widths[site.name])
    rebuild = _regroup_inputs(gm, sites)
    gm.recompile()
    if rebuild:
        _build_input_quantizers(gm, rebuild, calib_data, calib_examples)
    gm.graph.lint()
    gm.recompile()
    return list(widths)


def _is_quantized(site: LayerSite) -> bool:
    source = site.node.args[0] if site.node.args else None
    return (isinstance(getattr(site.module, "weight_quantizer", None), Quantizer)
            and isinstance(source, fx.Node) and "quant_input" in source.meta)


def _changes(sites: list[LayerSite], bits_for_layer: BitsForLayer) -> dict[str, int]:
    lookup = bits_for_layer.get if isinstance(bits_for_layer, dict) else bits_for_layer
    known = {site.name for site in sites}
    if isinstance(bits_for_layer, dict) and set(bits_for_layer) - known:
        raise ConfigError(f"requantize: no quantized layers {sorted(set(bits_for_layer) - known)}; "
                          f"quantized layers are {sorted(known)}")
    widths = {}
    for site in sites:
        bits = lookup(site.name)
        if bits is None:
            continue
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            raise ConfigError(f"requantize: bits for {site.name} must be an integer 1-8, "
                              f"got {bits!r}")
        meta = site.node.meta["quant"]
        if (meta["weight_bits"], meta["act_bits"]) != (bits, bits):
            widths[site.name] = bits
    return widths


def _new_weight_quantizer(site: LayerSite, bits: int) -> None:
    old = site.module.weight_quantizer
    weight = float_weight(site.module).detach()
    new = make_quantizer(old.method, "weight", bits, signed=old.signed,
                         per_channel=old.per_channel, channels=weight.shape[0],
                         channel_axis=old.channel_axis).to(weight.device)
    with torch.no_grad():
        new.initialize(weight)
    site.module.weight_quantizer = _like(new, old)
    site.node.meta["quant"].update(weight_bits=bits, act_bits=bits)


def _regroup_inputs(gm, sites) -> dict[str, tuple[fx.Node, Quantizer]]:
    """Rewire every layer to the input quantizer node of its (source tensor, bits, method), the
    method being the layer's (its weight quantizer's).

    A node already quantizing that tensor at those bits by that method is kept as it is;
    otherwise a node of the same tensor left free is reused, or a new one made, and listed for a
    new quantizer (by module path, with the quantizer whose method and signedness it inherits).
    Nodes left without readers are removed.
    """
    previous = {site.name: site.node.args[0] for site in sites}
    modules = {node: gm.get_submodule(node.target) for node in previous.values()}
    wanted: dict[tuple[fx.Node, int, str], list[LayerSite]] = {}
    for site in sites:
        key = (previous[site.name].args[0], site.node.meta["quant"]["act_bits"],
               site.module.weight_quantizer.method)
        wanted.setdefault(key, []).append(site)
    free = list(modules)
    chosen = {}
    for source, bits, method in wanted:
        match = [n for n in free if n.args[0] is source and n.meta["quant_input"]["bits"] == bits
                 and _layer_method(gm, n) == method]
        if match:
            chosen[(source, bits, method)] = match[0]
            free.remove(match[0])
    rebuild = {}
    for (source, bits, method), group in wanted.items():
        key = (source, bits, method)
        template = previous[group[0].name]
        if key not in chosen:
            same_source = [n for n in free if n.args[0] is source]
            node = same_source[0] if same_source else _new_input_node(gm, source, group[0].name)
            if same_source:
                free.remove(node)
            node.meta["quant_input"] = dict(template.meta["quant_input"])
            chosen[key] = node
            rebuild[node.target] = (node, modules[template])
        node = chosen[key]
        for site in group:
            site.node.replace_input_with(previous[site.name], node)
        node.meta["quant_input"].update(bits=bits, layers=[site.name for site in group])
    for node in free:
        gm.graph.erase_node(node)
        delattr(gm.get_submodule(INPUT_QUANTIZERS), node.target.rpartition(".")[2])
    return rebuild


def _new_input_node(gm: fx.GraphModule, source: fx.Node, layer: str) -> fx.Node:
    container = gm.get_submodule(INPUT_QUANTIZERS)
    base = name = f"{layer.replace('.', '_')}_input"
    index = 1
    while hasattr(container, name):
        index += 1
        name = f"{base}{index}"
    container.add_module(name, nn.Identity())
    with gm.graph.inserting_after(source):
        return gm.graph.call_module(f"{INPUT_QUANTIZERS}.{name}", (source,))


def _build_input_quantizers(gm, rebuild, calib_data, calib_examples) -> None:
    samples = None if calib_data is None else _samples(gm, list(rebuild), calib_data,
                                                       calib_examples)
    for name, (node, template) in rebuild.items():
        meta = node.meta["quant_input"]
        method = _layer_method(gm, node)
        if samples is None:
            quantizer, _ = activation_quantizer(template.method, meta["bits"], template.signed,
                                                template.channels)
        else:
            quantizer, _ = calibrated_activation_quantizer(method, meta["bits"], samples[name])
        set_submodule(gm, name, _like(quantizer, template))
        meta.update(method=quantizer.method, signed=quantizer.signed)


def _samples(gm, names, calib_data, calib_examples) -> dict[str, torch.Tensor]:
    inputs = sum(node.op == "placeholder" for node in gm.graph.nodes)
    batches = calibration_batches(calib_data, calib_examples, inputs)
    if not batches:
        raise ConfigError("no calibration batches to initialize the activation quantizers from: "
                          "pass calib_data, an iterable of model input tuples")
    bypassed = [m for m in _activation_quantizers(gm).values() if m.enabled]
    for module in bypassed:
        module.enabled = False
    try:
        return record_inputs(gm, names, batches)
    finally:
        for module in bypassed:
            module.enabled = True


def _activation_quantizers(gm: fx.GraphModule) -> dict[str, Quantizer]:
    """Every activation quantizer by module path: layer inputs, then boundary operands."""
    found = {}
    for container in (INPUT_QUANTIZERS, BOUNDARY_QUANTIZERS):
        if hasattr(gm, container):
            found.update({f"{container}.{name}": module for name, module
                          in gm.get_submodule(container).named_children()
                          if isinstance(module, Quantizer)})
    return found


def _layer_method(gm: fx.GraphModule, node: fx.Node) -> str:
    """The method of the layers reading ``node`` (their weight quantizer's; the input quantizer
    itself may be LSQ, where the method has no signed activations)."""
    layer = node.meta["quant_input"]["layers"][0]
    return gm.get_submodule(layer).weight_quantizer.method


def _like(new: Quantizer, old: nn.Module) -> Quantizer:
    """``new`` with the switches of ``old`` (enabled, hard, training, temperature, fixed
    thresholds), on its device."""
    reference = next(iter([*old.parameters(), *old.buffers()]), None)
    if reference is not None:
        new.to(reference.device)
    new.enabled = getattr(old, "enabled", True)
    new.set_hard(getattr(old, "hard", False))
    new.train(old.training)
    if hasattr(old, "temperature") and hasattr(new, "set_temperature"):
        new.set_temperature(float(old.temperature))
    if not getattr(old, "thresholds_learned", True) and hasattr(new, "learn_thresholds"):
        new.learn_thresholds(False)
    return new


def recalibrate(
    gm: fx.GraphModule,
    calib_data: Iterable,
    names: list[str] | None = None,
    calib_examples: int = CALIB_EXAMPLES,
) -> list[str]:
    """Re-initialize activation quantizers in place from the inputs ``calib_data`` now produces.

    ``names`` are module paths of ``input_quantizers.*`` and ``boundary_quantizers.*`` modules
    (all of them by default). The inputs are recorded as in :func:`requantize` (every
    activation quantizer bypassed), and each
    quantizer's :meth:`~qcompile.quant.base.Quantizer.initialize` sets its parameters from them:
    the ranges of a network whose weights have trained since the quantizers were calibrated.
    Returns the paths re-initialized.
    """
    names = names if names is not None else list(_activation_quantizers(gm))
    samples = _samples(gm, names, calib_data, calib_examples)
    with torch.no_grad():
        for name in names:
            gm.get_submodule(name).initialize(samples[name])
    return names
