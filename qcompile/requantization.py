"""Requantization: from an integer ``V`` to the next quantizer's code, by integer thresholds.

The simulated model computes ``y = V * S[c] + B[c]`` in float (a layer's accumulator with its
weight and input scales, its bias and folded batch norm), passes ``y`` through monotone
elementwise ops (ReLU, ReLU6, hardtanh: each a clamp to ``[low, high]``), and quantizes. Every
quantizer's code is the number of its decision thresholds ``t_k`` that the input reaches
(``x >= t_k``; for an affine quantizer ``t_k = (code_k - zero_point - 1/2) * scale``), so the
whole chain is a count of thresholds that ``V`` reaches, each mapped back through the clamps and
the affine map, in float64:

    clamp(y, low, high) >= t   <=>   y >= t  (low < t <= high),  always (t <= low),  never (t > high)
    V * S + B >= t             <=>   V >= ceil((t - B) / S)    (S > 0)
                               <=>  -V >= ceil((t - B) / -S)   (S < 0)
                               <=>   always or never, as B >= t (S == 0)

``always`` and ``never`` become thresholds just outside ``[-bound, bound]``, the range of ``V``.
The result is exact in real arithmetic; the simulated model evaluates ``y`` in float32, so the two
can disagree only where ``y`` lies within float32 rounding of a threshold (a rounding tie: there
the staircase rounds up, where ``torch.round`` rounds half to even).

A uniform staircase also has a fixed-point form, ``u = clamp((V * m + o) >> shift, 0, n)``, one
multiply, add and shift instead of ``n`` compares (and a compare and a max more where a clamp
before the quantizer lands several codes on one threshold: :class:`FixedPoint`).
:func:`fixed_point` searches for ``m``, ``o`` and ``shift`` and keeps them only when they give
the thresholds exactly on the whole range of ``V`` (an interval check per threshold, so "exact"
is proved, not sampled).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from qcompile.quant.base import IntegerSpec

MAX_SHIFT = 48
"""The largest shift :func:`fixed_point` tries. A wide accumulator range (a 3x7x7 8-bit first
layer reaches 1.7e6) narrows the slopes that reproduce 255 thresholds to a few 1e-10, which a
shift of 31 cannot resolve; ``V * m`` stays below ``2^61`` and ``k * 2^shift`` below ``2^57``,
so the offsets and the fixed-point sum stay in int64."""
MAX_MULTIPLIER = 2**31 - 1


def decision_thresholds(spec: IntegerSpec) -> torch.Tensor:
    """The inputs ``t_k`` at which ``spec`` reaches its ``k``-th code (float64, rows x n)."""
    if spec.thresholds is not None:
        return spec.thresholds.double().reshape(-1, spec.thresholds.shape[-1])
    codes = spec.codes.double()
    zero_point = spec.zero_point.double().reshape(-1, 1)
    scale = spec.scale.double().reshape(-1, 1)
    return (codes[1:] - zero_point - 0.5) * scale


def staircase(
    scale: torch.Tensor,
    bias: torch.Tensor,
    thresholds: torch.Tensor,
    bound: int,
    low: float = -math.inf,
    high: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer thresholds (C, n) and directions (C,) equivalent to quantizing
    ``clamp(V * scale + bias, low, high)`` with the float ``thresholds`` (1 or C rows, n).

    ``scale`` and ``bias`` have C entries (or one); the result has one row per channel.
    """
    scale = scale.double().reshape(-1, 1)
    bias = bias.double().reshape(-1, 1)
    t = thresholds.double()
    channels = max(scale.shape[0], bias.shape[0], t.shape[0])
    scale, bias = scale.expand(channels, 1), bias.expand(channels, 1)
    t = t.expand(channels, t.shape[-1])
    always = t <= low
    never = t > high
    magnitude = scale.abs()
    ratio = (t - bias) / torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))
    limit = float(bound + 1)
    integer = torch.ceil(ratio.clamp(-limit, limit))
    flat = magnitude == 0
    integer = torch.where(flat, torch.where(bias >= t, -limit, limit), integer)
    integer = torch.where(always, torch.full_like(integer, -limit), integer)
    integer = torch.where(never, torch.full_like(integer, limit), integer)
    direction = torch.where(scale[:, 0] < 0, -1, 1).to(torch.int64)
    return integer.to(torch.int64), direction


def apply_staircase(v: torch.Tensor, thresholds: torch.Tensor, direction: torch.Tensor
                    ) -> torch.Tensor:
    """``#{k : direction * V >= thresholds[k]}`` per channel of dimension 1 (int64)."""
    shape = [1] * v.dim()
    if thresholds.shape[0] > 1:
        shape[1] = thresholds.shape[0]
    signed = v * direction.reshape(shape)
    count = torch.zeros_like(v)
    for k in range(thresholds.shape[1]):
        count += signed >= thresholds[:, k].reshape(shape)
    return count


def apply_fixed_point(v: torch.Tensor, direction: torch.Tensor, multiplier: torch.Tensor,
                      offset: torch.Tensor, shift: int, top: int,
                      start: torch.Tensor | None = None, floor: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """``clamp((direction * V * multiplier + offset) >> shift, 0, top)`` per channel (int64);
    with ``start`` and ``floor``, ``clamp(..., floor, top)`` where ``direction * V >= start`` and
    0 below it."""
    shape = [1] * v.dim()
    if multiplier.shape[0] > 1:
        shape[1] = multiplier.shape[0]
    signed = v * direction.reshape(shape)
    line = (signed * multiplier.reshape(shape) + offset.reshape(shape)) >> shift
    if start is None:
        return torch.clamp(line, 0, top)
    codes = torch.minimum(torch.maximum(line, floor.reshape(shape)), torch.tensor(top))
    return torch.where(signed >= start.reshape(shape), codes, torch.zeros_like(codes))


@dataclass(frozen=True, eq=False)
class FixedPoint:
    """The fixed-point form of a staircase (:func:`apply_fixed_point`): per-channel
    ``multiplier`` and ``offset``, one ``shift``, and per-channel ``start`` and ``floor`` (both or
    neither)."""

    multiplier: torch.Tensor
    offset: torch.Tensor
    shift: int
    start: torch.Tensor | None = None
    floor: torch.Tensor | None = None

    def apply(self, v: torch.Tensor, direction: torch.Tensor, top: int) -> torch.Tensor:
        return apply_fixed_point(v, direction, self.multiplier, self.offset, self.shift, top,
                                 self.start, self.floor)


def fixed_point(thresholds: torch.Tensor, bound: int) -> FixedPoint | None:
    """The :class:`FixedPoint` that reproduces ``thresholds`` (C, n) on ``|V| <= bound``, or
    None when no shift up to :data:`MAX_SHIFT` gives one.

    The line alone is tried first. A clamp before the quantizer (ReLU into a quantizer whose zero
    point sits mid-range) lands the first ``j`` codes on one threshold ``t_1``, a jump (or, below
    the range, a flat stretch) no line makes; then ``start = t_1`` sends everything below it to
    code 0, ``floor = j`` holds the codes from there on at ``j`` or more, and the line is fitted
    to the thresholds above ``t_1`` only, on ``[t_1, bound]``.
    """
    t = thresholds.numpy().astype(np.int64)
    if t.shape[1] == 0 or bound >= 2**31:
        return None
    every = np.zeros(t.shape, dtype=bool)
    whole = _fit(t, every, np.full(len(t), -bound, dtype=np.int64), bound)
    if whole is not None:
        return FixedPoint(*whole)
    tied = t == t[:, :1]
    above = _fit(t, tied, np.clip(t[:, 0], -bound, bound), bound)
    if above is None:
        return None
    floor = torch.from_numpy(tied.sum(axis=1).astype(np.int64))
    return FixedPoint(*above, torch.from_numpy(t[:, 0].copy()), floor)


def _fit(t: np.ndarray, skipped: np.ndarray, low: np.ndarray, high: int
         ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """The line ``(V * m + o) >> shift`` that reaches code ``k`` exactly at ``t_k`` for every
    ``V`` in ``[low[c], high]``, thresholds where ``skipped`` aside.

    For a multiplier ``m > 0`` the fixed-point code reaches ``k`` at ``ceil((k 2^s - o) / m)``, so
    each threshold ``t_k`` inside the range confines ``o`` to ``[k 2^s - m t_k, k 2^s - m t_k + m)``
    and each one outside it to a half line. Intervals on a line meet when every two of them do,
    which bounds ``m / 2^s`` between the slopes of :func:`_slope_bounds`; the smallest ``m`` above
    the lower bound is taken and the offset checked against every threshold at once.
    """
    k = np.arange(1, t.shape[1] + 1, dtype=np.int64)
    low = low[:, None]
    inside = (t > low) & (t <= high) & ~skipped
    always = (t <= low) & ~skipped
    never = (t > high) & ~skipped
    lowest, highest = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    slope_low, slope_high = _slope_bounds(t, inside)
    for shift in range(MAX_SHIFT + 1):
        one = 1 << shift
        if (t.shape[1] + 1) * one >= 2**57:
            break
        m = np.floor(slope_low * one).astype(np.int64) + 1
        if (m >= slope_high * one).any() or (m > MAX_MULTIPLIER).any() or (
                m * high >= 2**61).any():
            continue
        m = m[:, None]
        floor = np.where(inside, k * one - m * t, np.where(always, k * one - m * low, lowest))
        ceiling = np.where(inside, k * one - m * t + m,
                           np.where(never, k * one - m * high, highest))
        floor, ceiling = floor.max(axis=1), ceiling.min(axis=1)
        if (floor < ceiling).all():
            offset = np.where(floor > lowest, floor, np.minimum(ceiling - 1, 0))
            return torch.from_numpy(m[:, 0].copy()), torch.from_numpy(offset), shift
    return None


def _slope_bounds(t: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the open interval of ``m / 2^s`` in which the intervals of every two thresholds
    inside the range meet: above ``max dk / (dt + 1)`` and below ``min dk / (dt - 1)`` over pairs
    ``k_a < k_b`` (``dk = k_b - k_a``, ``dt = t_b - t_a``; pairs with ``dt <= 1`` set no upper
    bound)."""
    low = np.zeros(len(t))
    high = np.full(len(t), np.inf)
    for c in range(len(t)):
        index = np.flatnonzero(inside[c])
        if len(index) < 2:
            continue
        dk = (index[None, :] - index[:, None]).astype(np.float64)
        dt = (t[c, index][None, :] - t[c, index][:, None]).astype(np.float64)
        pairs = dk > 0
        low[c] = (dk[pairs] / (dt[pairs] + 1)).max()
        capped = pairs & (dt > 1)
        if capped.any():
            high[c] = (dk[capped] / (dt[capped] - 1)).min()
    return low, high
