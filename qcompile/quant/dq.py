"""Direct quantization with learnable levels, and channel-aware activation quantization.

Hoang, Do, Nguyen and Cheung, "Direct Quantization for Training Highly Accurate Low Bit-width
Deep Neural Networks", IJCAI 2020. The paper makes two proposals, stated in its abstract as
quoted in spirit below; the equations that follow are this module's formulation of them, and may
differ in detail from the paper's own (how the levels are parameterized and updated, how the
channels are weighted). They are chosen so that both parts state an exact integer meaning.

Weights: direct quantization with learnable quantization levels. The usual scheme quantizes a
full-precision weight through a fixed map, so gradient descent moves the float weight but never
the quantized weight itself. Here the quantized weights *are* a table of learnable levels
``v_0 <= ... <= v_{2^b - 1}`` (per output channel when per-channel) and each weight selects the
nearest one:

    w_q = v_k,   k = #{j : w >= t_j},   t_j between v_j and v_{j+1} (the midpoint)

The gradient of ``w_q`` with respect to ``v_k`` is exact (one for every weight that selects
``v_k``), so a gradient step on the loss moves the quantized weights directly, all weights of a
level together; the float weight receives the gradient of ``w_q`` unchanged (straight-through),
which is what re-assigns weights to levels. The levels start at the 1-D k-means centroids of the
weights (the levels of least squared error), so training starts from the best fixed quantizer.
Integer meaning: codes ``0..2^b - 1`` (``-2^(b-1)..2^(b-1) - 1`` signed) selected by the
thresholds ``t_j``, with a ``values`` table per code (per channel). Non-uniform levels cannot be
one integer code times one scale, so for deployment the levels live on a per-channel integer grid:
``v_k = n_k * g`` with integers ``|n_k| <= 127`` and ``g = max_k |v_k| / 127`` (the forward uses
these snapped levels, the latent levels get their gradient straight through), and the spec's
``levels`` carry the ``n_k``: an integer layer multiplies 8-bit integers looked up by code. Each
threshold is kept strictly above the level below it, so a level re-quantizes to itself.

Activations: channel-aware quantization. A per-tensor activation quantizer fit to the total
squared error is dominated by the few channels of largest variance: the range stretches to their
outliers and the step is too coarse for the majority. Here the quantizer is a uniform one with a
learnable step ``s`` (``code = clamp(round(x / s))``, value ``code * s``, trained through a
straight-through round, which gives ``s`` the gradient ``round(x/s) - x/s`` inside the range and
the end code outside), and its objective weighs each channel by its own energy:

    E(s) = mean over channels c of  ||x_c - Q_s(x_c)||^2 / ||x_c||^2

so every channel counts by its relative error (noise-to-signal ratio), whatever its variance.
:meth:`DQActivationQuantizer.initialize` picks the step minimizing ``E`` on calibration
activations, and :meth:`DQActivationQuantizer.channel_aware_error` returns ``E`` as a
differentiable loss the training loop can add to keep learning it. Channels are dimension 1 of an
activation (N, C, ...). Integer meaning: one scale per tensor, affine, codes ``0..2^b - 1``
(unsigned) — the channel-aware part lives only in how ``s`` is chosen, so nothing per channel
remains to deploy: ``s`` folds into the preceding layer's requantization like any uniform
activation step. With ``per_channel=True`` each channel gets its own step (then each channel's
own error is minimized and the weighting is moot); such per-channel scales fold into the
preceding layer's per-output-channel requantization, but not into the next layer's integer
weights, whose accumulation sums over the channels — so per tensor is the deployable default.
1-bit signed activations are binary, ``+s`` for ``x >= 0`` and ``-s`` below.
"""

import torch
from torch import nn

from qcompile.quant.base import (
    IntegerSpec,
    Quantizer,
    replace_gradient,
    round_ste,
    threshold_index,
)
from qcompile.quant.fit import candidate_steps, kmeans_1d, rounding_errors, sample_columns
from qcompile.quant.registry import register_method

MIN_STEP = 1e-8
FEATURE_AXIS = 1
LEVEL_GRID = 127
"""Weight levels are integers in ``-LEVEL_GRID..LEVEL_GRID`` times a per-channel scale."""


def snap_levels(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Levels (C, K) on their integer grid: the snapped levels (gradient passed straight to
    ``levels``), the integers ``n`` (C, K) and the grid step ``g`` (C,), ``snapped == n * g``."""
    with torch.no_grad():
        grid = (levels.abs().amax(dim=1) / LEVEL_GRID).clamp_min(MIN_STEP)
        integers = torch.round(levels / grid[:, None]).clamp(-LEVEL_GRID, LEVEL_GRID)
        snapped = integers * grid[:, None]
    return replace_gradient(snapped, levels), integers.to(torch.int64), grid


def separating_thresholds(levels: torch.Tensor) -> torch.Tensor:
    """Thresholds (C, K - 1) between sorted levels (C, K): midpoints, kept in ``(v_j, v_{j+1}]``.

    The floor just above ``v_j`` makes ``v_j`` quantize to itself even where rounding would put
    the midpoint on ``v_j``; equal levels get the threshold ``v_{j+1}`` (the same value).
    """
    low, high = levels[..., :-1], levels[..., 1:]
    above_low = torch.nextafter(low, torch.full_like(low, float("inf")))
    midpoint = low + (high - low) / 2
    return torch.minimum(torch.maximum(midpoint, above_low), high)


def gather_levels(levels: torch.Tensor, index: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``levels[c, index]`` for every element, ``c`` its channel along ``axis`` (differentiable)."""
    if levels.shape[0] == 1:
        return levels[0][index]
    moved = index.movedim(axis, 0)
    rows = torch.gather(levels, 1, moved.reshape(levels.shape[0], -1))
    return rows.reshape(moved.shape).movedim(0, axis)


class DQWeightQuantizer(Quantizer):
    """Learnable quantization levels: the quantized weights are the levels themselves."""

    def __init__(self, bits, *, signed, per_channel=False, channels=1, channel_axis=0):
        super().__init__(bits, signed=signed, per_channel=per_channel, channels=channels,
                         channel_axis=channel_axis)
        count = 2**bits
        first = -(count // 2) if signed else 0
        self.register_buffer("codes", torch.arange(first, first + count), persistent=False)
        grid = torch.linspace(-1.0 if signed else 0.0, 1.0, count)
        self.levels = nn.Parameter(grid.repeat(self.channels, 1))

    def sorted_levels(self) -> torch.Tensor:
        """The levels in ascending order, snapped to their integer grid (:func:`snap_levels`)."""
        return snap_levels(self.levels.sort(dim=-1).values)[0]

    def integer_spec(self) -> IntegerSpec:
        """Codes selected by thresholds between the snapped levels; ``values`` is the level
        table, ``levels`` its integers on the per-channel grid ``scale``."""
        values, integers, grid = snap_levels(self.levels.detach().sort(dim=-1).values)
        thresholds = separating_thresholds(values)
        if not self.per_channel:
            values, thresholds, integers = values[0], thresholds[0], integers[0]
        zero = torch.zeros(self.channels, dtype=torch.int64)
        axis = self.channel_axis if self.per_channel else None
        return IntegerSpec(self.bits, self.codes.clone(), grid.clone(), zero, axis,
                           thresholds=thresholds.clone(), values=values.clone(), levels=integers)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The level each weight selects: the lookup ``spec.dequantize(spec.quantize(x))``
        makes, as one gather from the level table that also carries the levels' gradient."""
        levels = self.sorted_levels()
        with torch.no_grad():
            thresholds = separating_thresholds(levels.detach())
            index = threshold_index(x, thresholds, self.channel_axis if self.per_channel else None)
        axis = self.channel_axis % x.dim() if self.per_channel else None
        selected = gather_levels(levels, index, axis)
        return replace_gradient(selected.detach().to(x.dtype), selected + (x - x.detach()))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """The levels start at the k-means centroids of the weights (per channel if per-channel)."""
        rows = self.channel_rows(x.detach().to(self.levels.dtype))
        self.levels.copy_(kmeans_1d(rows, self.levels.shape[1]).to(self.levels.dtype))


class DQActivationQuantizer(Quantizer):
    """Channel-aware activation quantization: one uniform step fit to every channel's error."""

    def __init__(self, bits, *, signed, per_channel=False, channels=1, channel_axis=0):
        super().__init__(bits, signed=signed, per_channel=per_channel, channels=channels,
                         channel_axis=channel_axis)
        self.binary = signed and bits == 1
        if self.binary:
            self.qmin, self.qmax = -1, 1
        elif signed:
            self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            self.qmin, self.qmax = 0, 2**bits - 1
        self.step = nn.Parameter(torch.full((self.channels,), 1.0 / self.qmax))

    def step_size(self) -> torch.Tensor:
        """The step sizes in use, kept positive; the floor passes its gradient straight through,
        so a step an optimizer pushed below zero learns its way back instead of sticking there."""
        return replace_gradient(self.step.clamp_min(MIN_STEP), self.step)

    def integer_spec(self) -> IntegerSpec:
        """Affine codes ``qmin..qmax``, ``code = clamp(round(x / s))``, value ``code * s``."""
        s = self.step_size().detach().clone()
        zero = torch.zeros(self.channels, dtype=torch.int64)
        axis = self.channel_axis if self.per_channel else None
        if self.binary:
            return IntegerSpec(1, torch.tensor([-1, 1]), s, zero, axis,
                               thresholds=torch.zeros(1, dtype=s.dtype))
        return IntegerSpec(self.bits, torch.arange(self.qmin, self.qmax + 1), s, zero, axis)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        s = self.step_size().reshape(self.param_shape(x))
        if self.binary:
            one = torch.ones((), dtype=x.dtype, device=x.device)
            level = replace_gradient(torch.where(x >= 0, one, -one), torch.clamp(x / s, -1, 1))
        else:
            level = round_ste(torch.clamp(x / s, self.qmin, self.qmax))
        return level * s

    def feature_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as one row per channel: ``channel_axis`` when per-channel, else dimension 1."""
        if self.per_channel:
            return self.channel_rows(x)
        if x.dim() < 2:
            return x.reshape(1, -1)
        return x.movedim(FEATURE_AXIS, 0).reshape(x.shape[FEATURE_AXIS], -1)

    def channel_aware_error(self, x: torch.Tensor) -> torch.Tensor:
        """``E``: the mean over channels of each channel's squared error over its energy."""
        rows = self.feature_rows(x)
        error = (self.feature_rows(self.fake_quantize(x)) - rows).pow(2).sum(dim=1)
        energy = rows.detach().pow(2).sum(dim=1)
        live = energy > 0
        return (error[live] / energy[live]).mean() if bool(live.any()) else error.sum() * 0

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """The step minimizing ``E`` (per tensor), or each channel's own error (per channel)."""
        rows = sample_columns(self.feature_rows(x.detach().to(self.step.dtype)))
        if self.per_channel:
            step = rows.abs().mean(dim=1) if self.binary else self._own_steps(rows)
        else:
            energy = rows.pow(2).mean(dim=1)
            rows, energy = rows[energy > 0], energy[energy > 0]
            if rows.shape[0] == 0:
                return
            fit = self._binary_step if self.binary else self._shared_step
            step = fit(rows, energy)
        self.step.copy_(step.clamp_min(MIN_STEP))

    def _own_steps(self, rows: torch.Tensor) -> torch.Tensor:
        """Per channel: the step of least squared error on that channel alone."""
        steps = candidate_steps(rows.abs().amax(dim=1), max(self.qmax, -self.qmin))
        errors = rounding_errors(rows, steps, self.qmin, self.qmax)
        return steps.gather(0, errors.argmin(dim=0, keepdim=True))[0]

    def _shared_step(self, rows: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        """One step for every channel, minimizing ``E`` over a grid up to the largest magnitude."""
        steps = candidate_steps(rows.abs().amax().reshape(1), max(self.qmax, -self.qmin))
        errors = rounding_errors(rows, steps, self.qmin, self.qmax)
        return steps[(errors / energy).mean(dim=1).argmin()]

    def _binary_step(self, rows: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        """The binary step minimizing ``E``: ``mean|x_c|`` averaged with weights ``1/||x_c||^2``."""
        weights = 1 / energy
        return (rows.abs().mean(dim=1) * weights).sum(dim=0, keepdim=True) / weights.sum()


register_method(
    "dq",
    DQWeightQuantizer,
    DQActivationQuantizer,
    paper="Hoang et al., Direct Quantization for Training Highly Accurate Low Bit-width Deep "
    "Neural Networks, IJCAI 2020",
)
