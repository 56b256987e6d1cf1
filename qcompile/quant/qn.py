"""Quantization Networks (Yang et al., CVPR 2019): quantization as a sum of sigmoids.

The paper writes a quantizer as a non-linear function, a sum of unit steps ``A`` (Sec. 3.1),

    y = alpha * (sum_i s_i * A(beta * x - b_i) - o)

with the input scale ``beta``, the biases (thresholds) ``b_i``, the step heights ``s_i`` (the
gaps between adjacent quantization values), the offset ``o`` and the output scale ``alpha``.
Training relaxes each step into a sigmoid of temperature ``T`` (Sec. 3.2),

    y = alpha * (sum_i s_i * sigmoid(T * (beta * x - b_i)) - o)

and raises ``T`` as training goes on, so the soft function tends to the staircase that inference
uses. ``alpha``, ``beta`` and the ``b_i`` are learned end to end, as the authors describe the
function ("learnable biases and scales"). Their released code keeps the biases where its
initialization put them (buffers, not parameters) and learns ``alpha`` and ``beta`` alone;
:meth:`QNQuantizer.learn_thresholds` (False), :func:`fix_thresholds` on a model, or the CLI's
``--fixed-thresholds`` do the same here: the thresholds stay at the midpoints between levels, no
gradient is summed for them, and compiled training at 4-5 bits reads each element's threshold off
the grid instead of comparing it with every midpoint (:meth:`QNQuantizer.refresh_window`). On
the MNIST benchmark that trains faster at 4 bits and less accurately at 2
(``benchmarks/RESULTS.md``), so learned thresholds stay the default.

Here the quantization values are the integers ``v_0 < ... < v_n`` of the bit-width: ``-m..m``
with ``m = 2^(b-1) - 1`` signed (the paper's symmetric sets, ``o = m``), ``{-1, 1}`` for 1-bit
signed (``s_1 = 2``), and ``0..2^b - 1`` unsigned (``o = 0``); so every ``s_i`` is 1 (2 for
binary) and ``-o = v_0``. The paper also tries power-of-two sets such as ``{-4, -2, -1, 0, 1, 2,
4}``; uniform values are the deliberate choice here, because they keep the output an integer code
times one scale.

Integer meaning: the staircase counts the thresholds ``x`` reaches, so its code is ``v_k`` with
``k = #{i : x >= b_i / beta}`` and its value ``alpha * v_k``: thresholds ``b_i / beta`` (sorted;
with equal step heights the count does not depend on their order) and uniform levels. The hard
forward is that lookup, so :meth:`integer_spec` describes it bit for bit; its gradient is the soft
function's at the current temperature. ``x >= t`` replaces the paper's ``beta * x - b_i > 0``,
which differs only exactly at a threshold.

:meth:`set_temperature` sets ``T``. The soft function holds one sigmoid per threshold for every
element, so its cost grows with ``2^b``. At 6-8 bits (the first and last layers) it sums only the
sigmoids of a window of thresholds around each element, to within a proven bound of the full sum;
at 4-5 bits (and at 1-2 bits compiled), once annealing has saturated every sigmoid outside such
a window, the window's sum, which is then the clamped full sum itself (:meth:`soft_sum`). The
learned thresholds are not tied to the output levels, so a level may sit outside its own decision
interval: QN is not a projection (:attr:`projection`), and the thresholds are left as learned
rather than forced between the levels.

Initialization (:meth:`initialize`): the paper's released code clusters ``beta * x`` with 1-D
k-means and puts the ``b_i`` between the cluster centres; that suits its non-uniform value sets,
but with the uniform levels used here it makes the staircase a non-linear distortion of ``x``
(even at 8 bits the layer's output moves by a quarter). Instead the levels are fitted to the data
first, as a uniform grid of least squared error (step ``s`` per tensor or channel; ``E|x|`` for
binary), with ``beta = 1 / s`` and ``alpha = s``, and each ``b_i`` starts at the midpoint of its two
levels, the nearest-level boundary; training then moves the thresholds freely.

``alpha`` and ``beta`` are learned as their logarithms (``log_alpha``, ``log_beta``): they are
scales that span orders of magnitude (an 8-bit classifier's ``alpha`` starts near 1e-4), and an
optimizer step on the logarithm changes them by a ratio, so they stay positive and a step of
the usual learning rate cannot throw one past zero.

In eval mode the staircase is used, as at inference in the paper; in training the soft function
is, unless ``hard`` is set (the end of temperature annealing).

The first and last layers, when wider than 4 bits (8 by default), are quantized by LSQ unless
``first_last_method="qn"`` asks for QN there (``wide_edges`` of the method's registration). At 8
bits, late in annealing, the soft function's gradient is a comb: at ``T = 200`` 92% of inputs
spread uniformly over the range get less than 5% of the mean gradient and a few get 65 times it,
the same as at 2 bits, while the 8 bits are there to stay close to float. On the MNIST benchmark
(``benchmarks/RESULTS.md``, five seeds on each of two hosts) W2A2 with LSQ edges averaged 95.8% and
95.0% against 88.1% and 91.8% with QN's own, which ended 23 and 16 points below float on the same
seed on the two hosts; W4A4 came out equal on one host (five seeds) and 0.3-0.7 points lower on the
other (three); the step is 10-30% faster. Which of the two layers matters is not settled: LSQ on
either one alone left a collapsed seed.
"""

import functools
import math

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from qcompile.quant.base import IntegerSpec, Quantizer, replace_gradient
from qcompile.quant.fit import best_steps
from qcompile.quant.registry import register_method
from qcompile.quant.sigmoid_window import (
    gap_statistics,
    half_width_for,
    nearest_staircase,
    nearest_sum,
    saturated_width_for,
    sigmoid_term,
    window_spans,
    window_sum,
)

MIN_SCALE = 1e-8
UNROLLED_STEPS = 32
"""Below this many thresholds :meth:`QNQuantizer.soft` adds its sigmoids one at a time."""
NEAREST_STEPS = 14
"""From this many thresholds (4 and 5 bits: 14 or 15 and 30 or 31, signed or unsigned; below
:data:`WINDOWED_STEPS`) :meth:`QNQuantizer.soft` sums only the sigmoids near each element once
the others are saturated (:func:`~qcompile.quant.sigmoid_window.nearest_sum`): at 4 bits, with
thresholds a step apart, 2 of the 15 from ``T`` of 30 on and the nearest alone from 60 on (the
default annealing of 12 epochs passes 30 in its third epoch and 60 in its fifth; a compiled 4-bit
activation quantizer on 64x16x28x28, forward and backward: 5.7 ms with 2, 3.1 with 1). At 3 bits
a window of 2 of the 7 gained 10% compiled (4.5 -> 4.1 ms) and lost 20% eager (24 -> 30 ms), so
7 thresholds are summed in full."""
WINDOWED_STEPS = 32
"""From this many thresholds (6 bits and up) :meth:`QNQuantizer.soft_sum` tries a window of them.
With fewer, the gradients of the window's thresholds land in so few places that summing them
costs more than the sigmoids saved (a 4-bit small CNN, measured with a scatter-add: 48 ms a
compiled step summing all 15 sigmoids, 107 with windows of 4)."""
KEPT_SIGMOIDS = 3
"""Up to this many thresholds (1 and 2 bits), a compiled :meth:`QNQuantizer.soft` keeps its
sigmoids for the backward pass (:data:`keep_sigmoids`). Each kept sigmoid holds a tensor the size
of the input until the backward pass, and with more of them nothing was gained: a compiled 3-bit
activation quantizer's 7 on 64x16x28x28, forward and backward, 5.09 -> 5.01 ms; a 4-bit window of
2, 4.7 -> 4.5 and 5.0 -> 5.2 ms in two runs (against 2.5 -> 1.9 ms at 2 bits, interleaved in one
process)."""


class QNQuantizer(Quantizer):
    """The quantization function of Quantization Networks, for weights and activations alike."""

    projection = False

    def __init__(self, bits, *, signed, per_channel=False, channels=1, channel_axis=0):
        super().__init__(bits, signed=signed, per_channel=per_channel, channels=channels,
                         channel_axis=channel_axis)
        if signed and bits == 1:
            values = torch.tensor([-1, 1])
        elif signed:
            top = 2 ** (bits - 1) - 1
            values = torch.arange(-top, top + 1)
        else:
            values = torch.arange(0, 2**bits)
        self.register_buffer("values", values, persistent=False)
        # The step heights s_i and v_0 = -o as numbers: constants of a compiled graph.
        self.heights = [int(h) for h in values[1:] - values[:-1]]
        self.lowest = int(values[0])
        self.register_buffer("temperature", torch.tensor(1.0))
        self.log_alpha = nn.Parameter(torch.zeros(self.channels))
        self.log_beta = nn.Parameter(torch.zeros(self.channels))
        midpoints = (values[1:] + values[:-1]).float() / 2
        self.biases = nn.Parameter(midpoints.repeat(self.channels, 1))
        self.thresholds_learned = True
        self.soft_window: int | None = None
        # v_0 while the thresholds are fixed at the midpoints v_0 + 1/2, v_0 + 3/2, ... (compiled
        # 4-5 bits: see refresh_window), else None.
        self.soft_grid: int | None = None
        # Where each sorted threshold sits in its row of biases, as refresh_window found it.
        self.register_buffer("order", torch.arange(len(midpoints)).repeat(self.channels, 1),
                             persistent=False)

    def learn_thresholds(self, learned: bool = True) -> "QNQuantizer":
        """Learn the thresholds ``b_i`` with ``alpha`` and ``beta`` (the default), or, with False,
        keep them where they are, as the paper's released code does (module docstring)."""
        self.thresholds_learned = learned
        self.biases.requires_grad_(learned)
        return self

    def set_temperature(self, temperature: float) -> "QNQuantizer":
        """Set the sigmoids' temperature ``T``; the paper raises it during training."""
        self.temperature.fill_(float(temperature))
        return self

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, beta)`` as used."""
        return self.alpha, self.beta

    @property
    def alpha(self) -> torch.Tensor:
        """The output scale, ``exp(log_alpha)``."""
        return self.log_alpha.exp()

    @property
    def beta(self) -> torch.Tensor:
        """The input scale, ``exp(log_beta)``."""
        return self.log_beta.exp()

    def midpoints(self) -> torch.Tensor:
        """The points halfway between adjacent levels, where :meth:`initialize` puts the
        thresholds, in the thresholds' dtype."""
        return (self.values[1:] + self.values[:-1]).to(self.biases.dtype) / 2

    def step_heights(self) -> torch.Tensor:
        return (self.values[1:] - self.values[:-1]).to(self.biases.dtype)

    def _spec(self, alpha, beta, biases) -> IntegerSpec:
        thresholds = (biases / beta[:, None]).sort(dim=-1).values
        if not self.per_channel:
            thresholds = thresholds[0]
        zero = torch.zeros(self.channels, dtype=torch.int64)
        axis = self.channel_axis if self.per_channel else None
        return IntegerSpec(self.bits, self.values.clone(), alpha, zero, axis, thresholds=thresholds)

    def integer_spec(self) -> IntegerSpec:
        """Codes ``v_k``, thresholds ``b_i / beta``, value ``alpha * code``."""
        alpha, beta = self.scales()
        biases = self.biases.detach().clone()
        return self._spec(alpha.detach().clone(), beta.detach().clone(), biases)

    def soft(self, x: torch.Tensor, alpha, beta) -> torch.Tensor:
        """The soft function, :meth:`soft_sum`.

        Under ``torch.compile``, with at most :data:`KEPT_SIGMOIDS` thresholds, the backward pass
        reads the sigmoids the forward computed. Left to itself the compiler's partitioner, which
        weighs memory rather than exponentials, computes them again in the backward pass, where
        inductor also stores them to read them back for one of its sums in a second pass: a
        compiled 2-bit activation quantizer on 64x16x28x28, forward and backward, 2.5 -> 1.9 ms
        (the backward alone 1.9 -> 0.9). The values and gradients are the same expressions.
        Once the nearest threshold alone is summed (:attr:`soft_window` 1),
        :func:`~qcompile.quant.sigmoid_window.nearest_staircase` keeps what its backward pass
        needs itself.
        """
        kept = self.biases.shape[-1] <= KEPT_SIGMOIDS and self.soft_window != 1
        if kept and torch.compiler.is_compiling():
            return checkpoint(self.soft_sum, x, alpha, beta, use_reentrant=False,
                              context_fn=keep_sigmoids)
        return self.soft_sum(x, alpha, beta)

    def soft_sum(self, x: torch.Tensor, alpha, beta) -> torch.Tensor:
        """``alpha * (v_0 + sum_i s_i * sigmoid(T * (beta * x - b_i)))`` (Sec. 3.2).

        From :data:`WINDOWED_STEPS` thresholds on (6 bits and up, where every step height is 1),
        the sigmoids are summed over a window of the sorted thresholds around each element when
        a window meets :data:`~qcompile.quant.sigmoid_window.TOLERANCE` of a step
        (:mod:`qcompile.quant.sigmoid_window`): at 8 bits 32 sigmoids instead of 255 at ``T =
        1``, and 4 from ``T`` of about 6 on. From :data:`NEAREST_STEPS` thresholds (4-5 bits) a
        window is used only once every sigmoid outside it is saturated, which leaves the value
        and gradients of the clamped full sum as they are (:func:`~qcompile.quant.sigmoid_window.
        nearest_sum`; a compiled 4-bit activation quantizer on 64x16x28x28, forward and
        backward: 11.7 -> 5.6 ms at ``T = 37``; eager 47 -> 28 ms). Otherwise all of them are
        summed:
        fewer than :data:`UNROLLED_STEPS` one by one, each an elementwise operation on ``x``, so
        there is no (elements, thresholds) temporary, whose memory traffic dominates in eager
        mode and whose gradient for the biases ``torch.compile`` turns into a slow strided
        reduction. Each term reads its threshold as a column ``biases[:, k]`` and its step height
        as a number: indexing the last axis of the broadcast biases, or multiplying by an element
        of a heights tensor, made inductor store every term's gradient and reduce it in a second
        pass (a compiled activation quantizer's forward and backward on 64x16x28x28: 2-bit
        5.5 -> 3.2 ms, 4-bit 17.0 -> 11.1 ms).
        """
        shape = self.param_shape(x)
        scaled = beta.reshape(shape) * x
        biases = self.biases.reshape(*shape, -1)
        count = biases.shape[-1]
        width = self.window_width()
        if width is not None:
            ordered = self.sorted_biases()
            axis = self.channel_axis if self.per_channel else None
            if width == 1 and count < WINDOWED_STEPS and torch.compiler.is_compiling():
                # alpha goes in too: its gradient then reads the output, not the sigmoid
                return nearest_staircase(scaled, ordered, self.temperature, alpha.reshape(shape),
                                         self.lowest, axis, grid=self.soft_grid)
            window = window_sum if count >= WINDOWED_STEPS else nearest_sum
            total = window(scaled, ordered, self.temperature, width, axis)
            return alpha.reshape(shape) * (total + self.lowest)
        if count < UNROLLED_STEPS:
            total = None
            for k, height in enumerate(self.heights):
                term = sigmoid_term(self.temperature
                                    * (scaled - self.biases[:, k].reshape(shape)))
                term = term if height == 1 else height * term
                total = term if total is None else total + term
        else:
            steps = sigmoid_term(self.temperature * (scaled.unsqueeze(-1) - biases))
            total = (steps * self.step_heights()).sum(dim=-1)
        return alpha.reshape(shape) * (total + self.lowest)

    def sorted_biases(self) -> torch.Tensor:
        """The rows of ``biases`` sorted; under ``torch.compile`` a per-tensor row is gathered in
        the order :meth:`refresh_window` found (the thresholds get the gradients of their sorted
        places).

        An ``aten.sort`` in the compiled graph is a call inductor makes between its own kernels,
        and it kept the batch norm before an activation quantizer from fusing with the
        quantizer: the batch norm's kernel stored ``beta * x`` for the quantizer's to read back.
        Gathered, the two are one kernel (the small CNN's compiled QN W4A4 step: see
        ``benchmarks/RESULTS.md``). Per-channel rows (weights, small tensors) stay sorted in the
        graph: gathered per channel, inductor stored a ``bool`` mask element by element."""
        if torch.compiler.is_compiling() and self.biases.shape[0] == 1:
            return self.biases.gather(-1, self.order)
        return self.biases.sort(dim=-1).values

    def window_width(self) -> int | None:
        """How many thresholds around each element this call sums (None: all of them): chosen
        from the thresholds now in eager mode; under ``torch.compile``, which cannot branch on
        parameter values, what :meth:`refresh_window` chose before the step (None if it never
        ran)."""
        if torch.compiler.is_compiling():
            return self.soft_window
        if self.biases.shape[-1] < NEAREST_STEPS:
            return None  # eager sums 1-3 bits in full (_window_for)
        statistics = torch.stack(self._statistics(compiled=False)).tolist()
        return self._window_for(statistics, compiled=False)

    def _window_for(self, statistics: list[float], compiled: bool) -> int | None:
        """The window from :meth:`_statistics` read back: ``T``, the smallest gap, the spans of
        :func:`~qcompile.quant.sigmoid_window.window_spans` where a window may be chosen, and
        whether the thresholds are on the grid where they may be."""
        count = self.biases.shape[-1]
        temperature = statistics[0]
        smallest_gap = statistics[1] if count > 1 else math.inf
        # 1-2 bits, compiled: the nearest threshold alone (a compiled 2-bit activation quantizer
        # on 64x16x28x28, forward and backward, 1.9 -> 1.3 ms inside the kept-sigmoid
        # checkpoint, 1.36 -> 1.09 by nearest_staircase). Eager, its gather costs what the 3
        # sigmoids do (12.4-12.6 against 12.7-13.8 ms). 3 bits: never.
        nearest_only = count < NEAREST_STEPS
        if nearest_only and not (compiled and count <= KEPT_SIGMOIDS):
            return None
        saturated = saturated_width_for(smallest_gap, count, temperature)
        if nearest_only:
            return 1 if saturated == 1 else None
        if count < WINDOWED_STEPS or saturated == 1:
            return saturated
        spans = statistics[2:2 + len(window_spans(count))]
        half_width = half_width_for(spans, count, temperature)
        return None if half_width is None else 2 * half_width

    def refresh_window(self) -> None:
        """Choose the soft function's threshold window for the current thresholds and
        temperature, as eager mode does on every call (and at 1-2 bits the nearest threshold,
        which only the compiled form sums alone); the training loop calls this before each
        compiled step (:func:`~qcompile.qat.quantizers.refresh_windows`, which reads the
        statistics of all of a model's quantizers in one transfer: :meth:`window_statistics`,
        :meth:`apply_window_statistics`). The choice is a function of the parameters and ``T``
        alone, so a resumed run chooses what the uninterrupted one did. It also records the
        thresholds' order for :meth:`sorted_biases`.

        Fixed thresholds (no gradient: :meth:`learn_thresholds`) that sit exactly at the midpoints
        between the unit-spaced levels, as :meth:`initialize` puts them, make :attr:`soft_grid`
        ``v_0``: the compiled nearest-threshold function at 4-5 bits then reads the threshold
        nearest ``s`` as ``v_0 + 1/2 + clamp(floor(s) - v_0, 0, n - 1)``, the same number the 14
        or 30 comparisons give, in three operations (a compiled 4-bit activation quantizer after
        its batch norm on 64x16x28x28, forward and backward: 3.1-3.6 -> 2.5-3.0 ms; at 2 bits,
        against two comparisons, no gain, so 1-3 bits keep them)."""
        self.apply_window_statistics(torch.stack(self.window_statistics()).tolist())

    def window_statistics(self) -> list[torch.Tensor]:
        """Record the thresholds' order (:meth:`sorted_biases`) and return, as tensors of one
        number on their device (no wait for it), what :meth:`apply_window_statistics` chooses
        from: ``T``, the sorted rows' :func:`~qcompile.quant.sigmoid_window.gap_statistics` and,
        when fixed thresholds may be on the grid, whether they are."""
        return self._statistics(compiled=True)

    def apply_window_statistics(self, statistics: list[float]) -> None:
        """Set :attr:`soft_window` and :attr:`soft_grid` from :meth:`window_statistics` read
        back as numbers."""
        self.soft_window = self._window_for(statistics, compiled=True)
        on_grid = self._may_be_on_grid() and statistics[-1] == 1
        self.soft_grid = self.lowest if on_grid else None

    @torch.no_grad()
    def _statistics(self, compiled: bool) -> list[torch.Tensor]:
        count = self.biases.shape[-1]
        if compiled:
            ordered, order = self.biases.sort(dim=-1, stable=True)
            self.order.copy_(order)
        else:
            ordered = self.biases.sort(dim=-1).values
        statistics = [self.temperature]
        if count > 1:
            widths = (1, *window_spans(count)) if count >= WINDOWED_STEPS else (1,)
            statistics += gap_statistics(ordered, widths)
        if compiled and self._may_be_on_grid():
            statistics.append((self.biases == self.midpoints()).all())
        return statistics

    def _may_be_on_grid(self) -> bool:
        """Whether the thresholds are fixed, between levels 1 apart, and 14-31 of them (4-5
        bits, where the compiled form may sum the nearest alone): then they are on the grid if
        they sit exactly at the midpoints."""
        return (not self.biases.requires_grad
                and NEAREST_STEPS <= self.biases.shape[-1] < WINDOWED_STEPS
                and all(height == 1 for height in self.heights))

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.scales()
        if self.training and not self.hard:
            return self.soft(x, alpha, beta)
        with torch.no_grad():
            spec = self._spec(alpha.detach(), beta.detach(), self.biases.detach())
            value = spec.dequantize(spec.quantize(x)).to(x.dtype)
        wanted = x.requires_grad or any(p.requires_grad for p in self.parameters())
        if not (torch.is_grad_enabled() and wanted):
            return value
        return replace_gradient(value, self.soft(x, alpha, beta))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Levels on the least-squares uniform grid: ``beta = 1 / s``, ``alpha = s``, ``b_i`` at
        the midpoints between levels (see the module docstring)."""
        rows = self.channel_rows(x.detach().to(self.log_beta.dtype))
        if len(self.values) == 2 and self.signed:
            step = rows.abs().mean(dim=1)
        else:
            step = best_steps(rows, int(self.values[0]), int(self.values[-1]))
        step = step.clamp_min(MIN_SCALE)
        self.log_beta.copy_(-step.log())
        self.log_alpha.copy_(step.log())
        self.biases.copy_(self.midpoints().expand_as(self.biases))


class QNWeightQuantizer(QNQuantizer):
    """Quantization Networks for weights."""


class QNActivationQuantizer(QNQuantizer):
    """Quantization Networks for activations."""


def fix_thresholds(model: nn.Module) -> int:
    """Keep the thresholds of every QN quantizer in ``model`` where they are
    (:meth:`QNQuantizer.learn_thresholds`); returns how many quantizers that was."""
    quantizers = [m for m in model.modules() if isinstance(m, QNQuantizer)]
    for quantizer in quantizers:
        quantizer.learn_thresholds(False)
    return len(quantizers)


register_method(
    "qn",
    QNWeightQuantizer,
    QNActivationQuantizer,
    paper="Yang et al., Quantization Networks, CVPR 2019",
    wide_edges="lsq",
)


def _save_sigmoids(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op == torch.ops.aten.sigmoid.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


keep_sigmoids = functools.partial(create_selective_checkpoint_contexts, _save_sigmoids)
"""A selective-checkpoint context (``torch.utils.checkpoint``) under which a compiled backward
pass reads the forward's sigmoids and recomputes everything else."""
