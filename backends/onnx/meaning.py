"""A quantizer's integer meaning in the shapes ONNX can hold: weight integers, activation forms.

Both formats read a quantizer through :class:`~qcompile.quant.base.IntegerSpec` (hard mode):

- a weight is a constant, so it is always ``integers * step`` exactly (:func:`weight_integers`):
  ``codes - zero_point`` for an affine spec, ``2 (codes - zero_point)`` with half the scale for a
  half-integer zero point (DoReFa), the integer ``levels`` of a ``values`` table (DQ);
- an activation (:func:`activation_form`) is affine (``round(x / scale) + zero_point``) or a
  threshold staircase. :func:`uniform_grid` recognises a staircase whose thresholds are evenly
  spaced, ``t_k = offset + (k - 1/2) step`` (QIL activations, whose ``gamma`` is 1; QN before
  training moves its thresholds), which QuantizeLinear can compute after subtracting ``offset``.
"""

from dataclasses import dataclass

import numpy as np
import torch

from qcompile.errors import NotDeployableError
from qcompile.quant.base import IntegerSpec, Quantizer

GRID_TOLERANCE = 64 * float(np.finfo(np.float32).eps)
"""How far (relative to the largest threshold) a threshold may sit from its evenly spaced
place and still count as on it: float32 rounding of thresholds computed from a few parameters."""


@dataclass(frozen=True)
class WeightIntegers:
    """A quantized weight: ``values == integers * step`` exactly in float32, ``step`` per output
    channel (shape (C,)) or per tensor (shape ())."""

    values: torch.Tensor
    integers: torch.Tensor
    step: torch.Tensor
    spec: IntegerSpec


@dataclass(frozen=True)
class ActivationForm:
    """An activation quantizer's meaning: codes, the value map ``(code - zero_point) * scale``
    (per tensor, or per channel along ``axis``), and ``thresholds`` for a staircase; ``name``
    is the quantizer's submodule, ``where`` describes it in errors."""

    name: str
    where: str
    bits: int
    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    thresholds: np.ndarray | None


@dataclass(frozen=True)
class Grid:
    """Evenly spaced thresholds ``offset + (k - 1/2) * step``, per row; ``tolerance`` is how far
    an input may move without that description failing to hold."""

    step: np.ndarray
    offset: np.ndarray
    tolerance: np.ndarray


def integer_spec(quantizer: Quantizer, where: str) -> IntegerSpec:
    if not quantizer.enabled:
        raise NotDeployableError(f"{where} is switched off (stochastic precision?): switch every "
                                 "quantizer on before exporting")
    try:
        return quantizer.integer_spec()
    except NotImplementedError:
        raise NotDeployableError(f"{where} ({type(quantizer).__name__}) states no integer "
                                 "meaning, so it cannot be exported") from None


@torch.no_grad()
def weight_integers(quantizer: Quantizer, weight: torch.Tensor, where: str) -> WeightIntegers:
    """The weight ``quantizer`` makes of ``weight``, as integers times a per-channel step."""
    spec = integer_spec(quantizer, where)
    codes = spec.quantize(weight)
    values = spec.dequantize(codes).to(weight.dtype)
    channels = weight.shape[0]
    if spec.values is not None:
        if spec.levels is None:
            raise NotDeployableError(f"{where}: its weight levels are not integers on a grid")
        index = torch.searchsorted(spec.codes, codes.contiguous())
        levels = spec.levels.reshape(-1, len(spec.codes)).expand(channels, -1)
        integers = torch.gather(levels, 1, index.reshape(channels, -1)).reshape(codes.shape)
        step = spec.scale.reshape(-1)
    else:
        zero_point = _per_channel(spec.zero_point.double(), codes)
        multiple = _integer_multiple(spec.zero_point, where)
        integers = torch.round((codes.double() - zero_point) * multiple).to(torch.int64)
        step = spec.scale.reshape(-1) / multiple
    step = step.to(values.dtype)
    step = step.reshape(()) if step.numel() == 1 else step
    if step.numel() not in (1, channels):
        raise NotDeployableError(f"{where}: {step.numel()} scales for {channels} output channels")
    rebuilt = integers.to(values.dtype) * _per_channel(step, integers)
    if not torch.equal(rebuilt, values):
        raise NotDeployableError(f"{where}: the quantized weight is not its integers times one "
                                 "step per output channel, so DequantizeLinear cannot hold it")
    return WeightIntegers(values, integers, step, spec)


def activation_form(quantizer: Quantizer, name: str, where: str) -> ActivationForm:
    spec = integer_spec(quantizer, where)
    if spec.values is not None:
        raise NotDeployableError(f"{where} has non-uniform activation levels (a value table), "
                                 "which neither QDQ nor QONNX Quant can state")
    thresholds = spec.thresholds
    return ActivationForm(
        name, where, spec.bits, spec.codes.numpy().astype(np.int64),
        _squeeze(spec.scale.detach().float().numpy()),
        _squeeze(spec.zero_point.detach().double().numpy()), spec.axis,
        None if thresholds is None else thresholds.detach().float().numpy())


def uniform_grid(form: ActivationForm) -> Grid | None:
    """The even spacing of ``form``'s thresholds (per channel when they are), or None."""
    rows = form.thresholds.astype(np.float64).reshape(-1, form.thresholds.shape[-1])
    scale = np.broadcast_to(form.scale.astype(np.float64).reshape(-1), (rows.shape[0],))
    count = rows.shape[1]
    step = scale.copy() if count == 1 else (rows[:, -1] - rows[:, 0]) / (count - 1)
    offset = rows[:, 0] - step / 2
    grid = offset[:, None] + (np.arange(1, count + 1) - 0.5)[None, :] * step[:, None]
    tolerance = GRID_TOLERANCE * np.maximum(np.abs(rows).max(axis=1), np.abs(step))
    if np.any(step <= 0) or np.any(np.abs(rows - grid) > tolerance[:, None]):
        return None
    step = np.where(np.abs(step - scale) <= tolerance, scale, step)
    return Grid(step, offset, tolerance)


def arithmetic_codes(codes: np.ndarray) -> int | None:
    """The common difference of ``codes`` when they are evenly spaced (1, or 2 for ``{-1, 1}``)."""
    gaps = np.unique(np.diff(codes))
    return int(gaps[0]) if len(gaps) == 1 and gaps[0] > 0 else None


def _integer_multiple(zero_point: torch.Tensor, where: str) -> int:
    """1 when every zero point is an integer, 2 when every one is a multiple of 1/2."""
    for multiple in (1, 2):
        scaled = zero_point.double() * multiple
        if bool((scaled == torch.round(scaled)).all()):
            return multiple
    raise NotDeployableError(f"{where}: zero point {zero_point.tolist()} is not a multiple of 1/2")


def _per_channel(param: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``param`` shaped to broadcast along dimension 0 of ``like`` (a weight)."""
    if param.numel() == 1:
        return param.reshape(())
    return param.reshape(-1, *[1] * (like.dim() - 1))


def _squeeze(array: np.ndarray) -> np.ndarray:
    return array.reshape(()) if array.size == 1 else array.reshape(-1)
