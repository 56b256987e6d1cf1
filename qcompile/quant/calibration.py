"""Calibrating activation quantizers: the layer inputs calibration batches produce, and the
quantizer initialized from them.

Shared by the ``insert-quantizers`` pass (the first quantizers of a graph) and
:func:`qcompile.quant.requantize.requantize` (new quantizers at another bit-width during
training), so a layer input is calibrated the same way in both.
"""

from collections.abc import Iterable

import torch
from torch import fx, nn

from qcompile.errors import ConfigError
from qcompile.quant.base import Quantizer
from qcompile.quant.registry import make_quantizer

INPUT_QUANTIZERS = "input_quantizers"
"""The submodule of a quantized graph that holds the quantizer of every layer input."""
BOUNDARY_QUANTIZERS = "boundary_quantizers"
"""The submodule that holds the quantizers of residual-add and cat operands and pool inputs."""


def calibration_batches(calib_data: Iterable | None, limit: int = 64) -> list[tuple]:
    """Batches from ``calib_data`` (tuples of model inputs, or bare tensors) until ``limit``
    examples are gathered; ``[]`` when there are none."""
    batches, count = [], 0
    for batch in calib_data or []:
        batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        batches.append(batch)
        count += len(batch[0])
        if count >= limit:
            break
    return batches


def batches_for(ctx, limit: int, purpose: str) -> list[tuple]:
    """A pass's calibration batches: up to ``limit`` examples of the pipeline's ``calib_data``,
    else the example inputs (noted in the pass record); ``purpose`` names the user in errors."""
    batches = calibration_batches(ctx.option("calib_data"), limit)
    if batches:
        return batches
    if ctx.example_inputs is None:
        raise ConfigError(f"{purpose} needs calibration data (calib_data) or example inputs")
    ctx.note(f"no calibration data: {purpose} uses the example inputs")
    return [ctx.example_inputs]


@torch.no_grad()
def record_inputs(gm: fx.GraphModule, names: list[str], batches) -> dict[str, torch.Tensor]:
    """The input each submodule in ``names`` sees on ``batches``, concatenated over the batches.

    Runs in eval mode (batch norms normalise with running statistics and do not update them) and
    restores every module's training flag afterwards.
    """
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    hooks = [gm.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: seen[name].append(args[0].detach().clone()))
        for name in names]
    modes = {module: module.training for module in gm.modules()}
    gm.eval()
    try:
        for batch in batches:
            gm(*batch)
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes.items():
            module.training = mode
    missing = [name for name, values in seen.items() if not values]
    if missing:
        raise ConfigError(f"calibration never reached {missing}; check the calibration inputs")
    return {name: _joined(values) for name, values in seen.items()}


def _joined(values: list[torch.Tensor]) -> torch.Tensor:
    """What a module saw over its calls: batches joined, flattened when the calls' shapes
    differ (a quantizer shared by the operands of a concatenation)."""
    if all(v.shape[1:] == values[0].shape[1:] for v in values):
        return torch.cat(values)
    return torch.cat([v.reshape(-1) for v in values])


def activation_quantizer(
    method: str, bits: int, signed: bool, channels: int = 1
) -> tuple[Quantizer, bool]:
    """A new activation quantizer of ``method`` (channels along dim 1), and whether it fell back
    to LSQ because ``method`` has no signed activations."""
    try:
        return make_quantizer(method, "activation", bits, signed=signed, channels=channels,
                              channel_axis=1), False
    except ConfigError:
        if not signed:
            raise
        return make_quantizer("lsq", "activation", bits, signed=signed, channels=channels,
                              channel_axis=1), True


def calibrated_activation_quantizer(
    method: str, bits: int, sample: torch.Tensor
) -> tuple[Quantizer, bool]:
    """An activation quantizer initialized from ``sample`` (the recorded layer input), signed
    when the sample is negative anywhere; and the LSQ fallback flag of
    :func:`activation_quantizer`."""
    signed = bool(sample.min() < 0)
    channels = sample.shape[1] if sample.dim() > 1 else 1
    quantizer, fell_back = activation_quantizer(method, bits, signed, channels)
    quantizer.to(sample.device)
    with torch.no_grad():
        quantizer.initialize(sample)
    return quantizer, fell_back


def set_submodule(gm: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``gm`` (its parent must exist)."""
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)
