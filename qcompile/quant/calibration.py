"""Calibrating activation quantizers: the layer inputs calibration batches produce, and the
quantizer initialized from them.

Shared by the ``insert-quantizers`` pass (the first quantizers of a graph) and
:func:`qcompile.quant.requantize.requantize` (new quantizers at another bit-width during
training), so a layer input is calibrated the same way in both.
"""

import numpy as np
import torch
from torch import fx, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from qcompile.errors import ConfigError
from qcompile.ir.trace import from_numpy
from qcompile.quant.base import Quantizer
from qcompile.quant.registry import make_quantizer

INPUT_QUANTIZERS = "input_quantizers"
"""The submodule of a quantized graph that holds the quantizer of every layer input."""
BOUNDARY_QUANTIZERS = "boundary_quantizers"
"""The submodule that holds the quantizers of residual-add and cat operands and pool inputs."""
CALIB_EXAMPLES = 64
"""How many examples calibrate activation quantizers unless told otherwise."""


def calibration_batches(calib_data, limit: int = CALIB_EXAMPLES,
                        inputs: int | None = None) -> list[tuple]:
    """Batches of model inputs from ``calib_data`` until ``limit`` examples are gathered; ``[]``
    when there are none.

    ``calib_data`` is an iterable of batches (a list, a ``DataLoader``), each a tuple of the
    model's inputs or a bare tensor; a batch that holds more than the model's ``inputs`` (a
    loader's ``(inputs, labels)``) gives its first ``inputs``. One tensor or NumPy array is a
    single batch, and a map-style ``Dataset`` is batched here, as iterating either would give
    examples without their batch dimension. NumPy arrays become tensors, floating-point ones of
    torch's default dtype (NumPy's float64 would not meet a float32 model)."""
    if isinstance(calib_data, (torch.Tensor, np.ndarray)):
        calib_data = [calib_data]
    elif isinstance(calib_data, Dataset) and not isinstance(calib_data, IterableDataset):
        calib_data = DataLoader(calib_data, batch_size=min(limit, max(len(calib_data), 1)))
    batches, count = [], 0
    for batch in calib_data if calib_data is not None else []:
        batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        if inputs is not None and len(batch) < inputs:
            raise ConfigError(f"a calibration batch holds {len(batch)} tensors and the model "
                              f"takes {inputs} inputs: give batches of its inputs")
        batch = tuple(from_numpy(value) for value in batch[:inputs])
        if not batch or not isinstance(batch[0], torch.Tensor) or batch[0].dim() == 0:
            raise ConfigError("calibration batches are tuples of model input tensors with a "
                              f"batch dimension (or bare tensors); got {_kinds(batch)}")
        batches.append(batch)
        count += len(batch[0])
        if count >= limit:
            break
    return batches


def _kinds(batch: tuple) -> str:
    return "(" + ", ".join(type(value).__name__ if not isinstance(value, torch.Tensor)
                           else f"a tensor of shape {tuple(value.shape)}"
                           for value in batch) + ")"


class CalibrationData:
    """``calib_data`` read once for every pass that calibrates: batches are drawn from it as
    the passes ask for them and kept, so each pass sees the same batches (a shuffling loader
    would give each another draw, and a generator none after the first) and no more of a large
    loader is read than the passes use (64 examples for the activations, 128 for a sensitivity
    budget's Hessian estimate, unless the passes are told otherwise). :meth:`close` lets go of
    the source."""

    def __init__(self, source):
        self._source = iter(source)
        self._seen: list = []

    def __iter__(self):
        index = 0
        while True:
            if index == len(self._seen):
                if self._source is None:
                    return
                try:
                    self._seen.append(next(self._source))
                except StopIteration:
                    self._source = None
                    return
            yield self._seen[index]
            index += 1

    def close(self) -> None:
        self._source = None


def batches_for(ctx, limit: int, purpose: str) -> list[tuple]:
    """A pass's calibration batches: up to ``limit`` examples of the pipeline's ``calib_data``,
    else the example inputs (noted in the pass record); ``purpose`` names the user in errors."""
    inputs = None if ctx.example_inputs is None else len(ctx.example_inputs)
    batches = calibration_batches(ctx.option("calib_data"), limit, inputs)
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
