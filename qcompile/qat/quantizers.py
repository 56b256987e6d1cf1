"""The quantizers of a quantized graph as the training schedules see them.

``insert-quantizers`` gives every quantized layer a ``weight_quantizer`` and puts an activation
quantizer, under the ``input_quantizers`` submodule, on each layer input (shared by the layers
that read one tensor at one bit-width); ``quantize-boundaries`` adds ``boundary_quantizers`` on
residual operands and pool inputs (activations too, but of no layer: stochastic precision's
per-layer switching leaves them on). A schedule switches them by role (weights, activations),
by layer (a layer's weight quantizer with its input's), or by capability (a temperature).
"""

from collections.abc import Iterable

import torch
from torch import fx, nn

from qcompile.quant.base import Quantizer
from qcompile.quant.calibration import BOUNDARY_QUANTIZERS, INPUT_QUANTIZERS
from qcompile.quant.layers import quantizable_layers


def activation_quantizers(gm: nn.Module) -> list[Quantizer]:
    """The quantizers of activations: on layer inputs (``input_quantizers.*``), then on residual
    operands and pool inputs (``boundary_quantizers.*``)."""
    found = []
    for name in (INPUT_QUANTIZERS, BOUNDARY_QUANTIZERS):
        container = getattr(gm, name, None)
        if container is not None:
            found += [m for m in container.children() if isinstance(m, Quantizer)]
    return found


def weight_quantizers(gm: nn.Module) -> list[Quantizer]:
    """The ``weight_quantizer`` of every quantized layer."""
    return [module.weight_quantizer for module in gm.modules()
            if isinstance(getattr(module, "weight_quantizer", None), Quantizer)]


def layer_groups(gm: fx.GraphModule) -> list[list[Quantizer]]:
    """One list per quantized layer input: its activation quantizer and the weight quantizers of
    the layers that read it (so a layer's weights and input are always switched together)."""
    groups: dict[str, list[Quantizer]] = {}
    for site in quantizable_layers(gm):
        weights = getattr(site.module, "weight_quantizer", None)
        if not isinstance(weights, Quantizer):
            continue
        source = site.node.args[0] if site.node.args else None
        key = source.target if isinstance(source, fx.Node) and source.op == "call_module" else None
        inputs = gm.get_submodule(key) if key is not None else None
        if isinstance(inputs, Quantizer):
            groups.setdefault(key, [inputs]).append(weights)
        else:
            groups[site.name] = [weights]
    return list(groups.values())


def annealable_quantizers(gm: nn.Module) -> list[nn.Module]:
    """Quantizers with a temperature to anneal (a ``set_temperature`` method)."""
    return [module for module in gm.modules() if callable(getattr(module, "set_temperature", None))]


def window_quantizers(gm: nn.Module) -> list[nn.Module]:
    """The modules of ``gm`` that choose a window of their thresholds before a compiled step
    (``refresh_window``), for :func:`refresh_windows`. The training loop lists them once per
    optimizer it builds: walking a ResNet-18's 130 modules for them took 0.3 ms a step."""
    return [module for module in gm.modules() if callable(getattr(module, "refresh_window", None))]


def refresh_windows(quantizers: Iterable[nn.Module]) -> None:
    """Let each of ``quantizers`` (:func:`window_quantizers`), which evaluate a soft function over
    a window of their thresholds, choose that window from its current parameters
    (``refresh_window``), outside a compiled step.

    Quantizers that report what they choose from (``window_statistics``, then
    ``apply_window_statistics``; QN's) are read back together, one transfer per device: on a GPU
    each read is a wait for the device, and one at a time they were two to eight per quantizer
    and step."""
    batched: dict[torch.device, list[tuple[nn.Module, list[torch.Tensor]]]] = {}
    for module in quantizers:
        if callable(getattr(module, "apply_window_statistics", None)):
            statistics = module.window_statistics()
            batched.setdefault(statistics[0].device, []).append((module, statistics))
        else:
            module.refresh_window()
    for pairs in batched.values():
        numbers = iter(torch.stack([number for _, statistics in pairs
                                    for number in statistics]).tolist())
        for module, statistics in pairs:
            module.apply_window_statistics([next(numbers) for _ in statistics])


def attach_gates(gm: nn.Module, device: torch.device) -> list[Quantizer]:
    """Give every quantizer a ``gate`` tensor that mirrors ``enabled`` (:func:`sync_gates`), so
    that a compiled step reads the switch as data and one graph serves every combination of
    quantizers on and off. Stochastic precision draws a new combination every step; with the
    switch as a Python flag each one was a new graph to compile, and past dynamo's limit of 8 the
    rest ran eagerly (LSQ W2A2, 4 short epochs: 8 graphs, 61 s). Returns the gated quantizers."""
    gated = [module for module in gm.modules() if isinstance(module, Quantizer)]
    for quantizer in gated:
        quantizer.gate = torch.tensor(bool(quantizer.enabled), device=device)
    return gated


def sync_gates(quantizers: list[Quantizer]) -> None:
    """Copy each quantizer's ``enabled`` into its gate (before a compiled step)."""
    for quantizer in quantizers:
        quantizer.gate.fill_(bool(quantizer.enabled))


def drop_gated_off_gradients(quantizers: list[Quantizer]) -> None:
    """Leave the parameters of quantizers switched off this step without a gradient, as an
    eager step leaves them: the gate gives them zeros, which an optimizer with momentum (Adam)
    would still step on."""
    for quantizer in quantizers:
        if not quantizer.enabled:
            for param in quantizer.parameters():
                param.grad = None


def detach_gates(quantizers: list[Quantizer]) -> None:
    """Take the gates away again (the run is over): the switch is ``enabled`` alone."""
    for quantizer in quantizers:
        quantizer.gate = None


def model_input_quantizers(gm: fx.GraphModule) -> list[Quantizer]:
    """The quantizers that read one of the model's own inputs (the first layer's input)."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, Quantizer) and node.args[0].op == "placeholder" \
                and module not in found:
            found.append(module)
    return found


def freeze_model_input_quantizers(gm: fx.GraphModule) -> list[nn.Parameter]:
    """Keep the calibrated parameters of the quantizers of the model's inputs; return those this
    froze, for the caller to thaw when its training ends.

    Learning them makes the backward pass compute the first layer's input gradient, which the
    float model never does: on the small CNN a one-channel convolution whose input gradient
    costs ~2.7 ms, a fifth of a compiled quantized step. Calibration has already seen the data
    itself (not an activation that training moves), at 8 bits where first and last layers are:
    on mnist5k, QIL, LSQ and PACT at W4A4 and W2A2 ended within 0.5 points of the learned runs,
    some above and some below (``benchmarks/qat_mnist.py [--learn-input-quantizers]``), which is
    run-to-run noise on 1,000 test images. So :func:`qcompile.train` keeps
    them unless ``learn_input_quantizers=True``."""
    frozen = [param for quantizer in model_input_quantizers(gm)
              for param in quantizer.parameters() if param.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    return frozen
