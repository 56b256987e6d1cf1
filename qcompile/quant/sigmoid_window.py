"""Quantization Networks' sum of sigmoids, evaluated over a window of thresholds near each input.

The soft staircase of Quantization Networks (Yang et al., CVPR 2019, Sec. 3.2) with ``n`` unit
steps is ``sum_i sigmoid(T * (s - b_i))`` for the scaled input ``s``. At 8 bits that is 255
sigmoids per element, forward and backward, although all but those of the thresholds near ``s``
are saturated: with the thresholds sorted, every ``b_i`` far below ``s`` contributes 1 and every
one far above 0 to within ``exp(-T * distance)``. :func:`window_sum` therefore counts the
thresholds below a window of ``2 W`` sorted thresholds around ``s`` as whole steps, those above
as nothing, and evaluates sigmoids only inside the window.

The error has a bound that :func:`truncation_bound` computes from the thresholds themselves.
Let ``k`` count the thresholds ``<= s``; the window starts at ``lo = clamp(k - W, 0, n - 2W)``.
A threshold ``b_i`` below it has ``i + W <= k - 1``, so ``s - b_i >= b_{k-1} - b_i``, which spans
at least ``1 + floor(m / W)`` disjoint runs of ``W`` gaps for the ``m``-th threshold below the
window (the same holds above it). With ``G`` the smallest span of ``W`` consecutive gaps and
``a = T * G``, each side misses at most ``W * sum_{r >= 1} exp(-a r)``, so in units of a step

    |window_sum - full sum| <= 2 W exp(-a) / (1 - exp(-a)),

and the derivative in ``s`` misses at most ``T`` times that. Thresholds that crowd together make
``G`` small and the bound large; :func:`choose_half_width` then picks a wider window, or none
(the full sum). The bound holds for any thresholds, not just evenly spaced ones.

For the 14-31 thresholds of 4-5 bits, whose windows are too few per threshold for that bound to
pay, :func:`nearest_sum` uses a window only once every sigmoid outside it is saturated
(:func:`saturated_width`): the two thresholds around each element, then the nearest one alone.
It computes the clamped full sum itself, not an approximation of it. Compiled, the nearest
threshold alone is :func:`nearest_staircase`, whose backward pass is written out.

The gradient of the window's thresholds is each element's contribution summed into the
threshold it read. A scatter-add (``index_put_``, or inductor's atomic adds) sums them in
whatever order the threads reach them, which makes two runs of the same step differ in the last
bits, and a resumed run drift from the uninterrupted one; :class:`GatherThresholds` sums them with
:func:`threshold_gradient`, one pass in a fixed order (``torch.bincount``, in float64), an
operator of our own so ``torch.compile`` calls it as it is. That order is fixed on the CPU; on a
GPU ``bincount`` adds atomically, as most of torch's GPU reductions into shared places do.
"""

import functools
import math

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from qcompile.quant.base import threshold_index

HALF_WIDTHS = (2, 4, 8, 16, 32, 64)
"""Window half-widths ``W`` tried, smallest first (2W sigmoids per element)."""
TOLERANCE = 1e-4
"""Largest truncation error allowed, in units of one step of the staircase."""
SATURATION = 30.0
"""``|T * (s - b)|`` beyond which a sigmoid is taken as saturated (see :func:`sigmoid_term`)."""


def sigmoid_term(z: torch.Tensor) -> torch.Tensor:
    """``sigmoid(z)`` with ``z`` clamped to ``[-SATURATION, SATURATION]``.

    As the temperature grows, most elements sit tens of units from every threshold, where the
    sigmoid's tail (``exp(-60) = 9e-27``) times a gradient lands below float32's smallest normal
    number: subnormal arithmetic, which x86 CPUs run tens of times slower, made the later epochs
    of a compiled QN W4A4 run 2.6x slower than its first (60-70 ms a step against 23). Clamped,
    a tail is at least ``exp(-30) = 9e-14``; the forward changes by less than that per term
    (``sigmoid(30)`` is 1 in float32) and the gradient loses only terms below it.
    """
    return torch.sigmoid(z.clamp(-SATURATION, SATURATION))


def truncation_bound(sorted_biases: torch.Tensor, temperature: float, half_width: int) -> float:
    """The bound above for rows of sorted thresholds (C, n) and the window half-width ``W``."""
    spans = sorted_biases[..., half_width:] - sorted_biases[..., :-half_width]
    return bound_for_span(float(spans.min()), temperature, half_width)


def bound_for_span(span: float, temperature: float, half_width: int) -> float:
    """The bound above from ``G``, the smallest span of ``W`` consecutive gaps."""
    exponent = temperature * span
    if exponent <= 0:
        return math.inf
    return 2 * half_width * math.exp(-exponent) / -math.expm1(-exponent)


def choose_half_width(sorted_biases: torch.Tensor, temperature: float,
                      tolerance: float = TOLERANCE) -> int | None:
    """The smallest ``W`` of :data:`HALF_WIDTHS` whose bound is within ``tolerance``, or None
    when no window smaller than all the thresholds is (then the full sum is the one to use)."""
    count = sorted_biases.shape[-1]
    spans = [float(span) for span in gap_statistics(sorted_biases, window_spans(count))]
    return half_width_for(spans, count, temperature, tolerance)


def window_spans(count: int) -> tuple[int, ...]:
    """The ``W`` of :data:`HALF_WIDTHS` whose windows of ``2 W`` are smaller than ``count``
    thresholds: those :func:`half_width_for` may choose from."""
    return tuple(width for width in HALF_WIDTHS if 2 * width < count)


def gap_statistics(sorted_biases: torch.Tensor, widths: tuple[int, ...]) -> list[torch.Tensor]:
    """For each of ``widths`` (each below the row length), the smallest span of that many
    consecutive gaps in rows of sorted thresholds (C, n), as a tensor of one number on their
    device (width 1: the smallest gap); stacked with others, they are read back in one
    transfer."""
    with torch.no_grad():
        return [(sorted_biases[..., width:] - sorted_biases[..., :-width]).min()
                for width in widths]


def half_width_for(spans: list[float], count: int, temperature: float,
                   tolerance: float = TOLERANCE) -> int | None:
    """:func:`choose_half_width` from the spans of :func:`gap_statistics` for
    :func:`window_spans` of ``count``."""
    for half_width, span in zip(HALF_WIDTHS, spans):
        if bound_for_span(span, temperature, half_width) <= tolerance:
            return half_width
    return None


@torch.library.custom_op("qcompile::threshold_gradient", mutates_args=())
def threshold_gradient(window: torch.Tensor, grad: torch.Tensor, count: int) -> torch.Tensor:
    """``out[i] = sum of grad[e] over the e with window[e] == i``, for ``i < count``, summed in
    a fixed order (deterministic)."""
    sums = torch.bincount(window.reshape(-1), weights=grad.reshape(-1).to(torch.float64),
                          minlength=count)
    return sums.to(grad.dtype)


@threshold_gradient.register_fake
def _(window: torch.Tensor, grad: torch.Tensor, count: int) -> torch.Tensor:
    return grad.new_empty(count)


class GatherThresholds(torch.autograd.Function):
    """``flat[window]``, whose backward sums the gradient with :func:`threshold_gradient`."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(window)
        ctx.count = flat.numel()
        return flat[window]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (window,) = ctx.saved_tensors
        return threshold_gradient(window, grad.contiguous(), ctx.count), None


def window_sum(scaled: torch.Tensor, sorted_biases: torch.Tensor, temperature: torch.Tensor,
               width: int, axis: int | None) -> torch.Tensor:
    """``sum_i sigmoid(T * (scaled - b_i))`` over the ``width`` sorted thresholds of each
    element's window (:func:`window_start`), counting those below it as whole steps: within
    :func:`truncation_bound` of the full sum for a window of ``2 W``.

    ``sorted_biases`` is (C, n), rows non-decreasing, one row per channel along ``axis`` of
    ``scaled`` (a single row when per tensor); gradients reach ``scaled``, ``sorted_biases`` (the
    window's, per element) and ``temperature``.
    """
    channels, count = sorted_biases.shape
    lower = window_start(scaled, sorted_biases, width, axis).long()
    with torch.no_grad():
        start = lower
        if channels > 1:
            shape = [1] * scaled.dim()
            shape[axis % scaled.dim()] = channels
            rows = torch.arange(channels, device=scaled.device).reshape(shape)
            start = lower + rows * count
        window = start.unsqueeze(-1) + torch.arange(width, device=scaled.device)
    biases = GatherThresholds.apply(sorted_biases.reshape(-1), window)
    steps = sigmoid_term(temperature * (scaled.unsqueeze(-1) - biases)).sum(dim=-1)
    return lower.to(scaled.dtype) + steps


def saturated_width(sorted_biases: torch.Tensor, temperature: float) -> int | None:
    """How many thresholds around each element leave out only saturated sigmoids: 1 (the
    nearest) when ``T`` times the smallest gap exceeds ``2 * SATURATION``, 2 (the two around
    it) when it exceeds :data:`SATURATION`, else None.

    For the few thresholds of 1-5 bits (:func:`nearest_sum`; the window of 2 from 4 thresholds
    on). A threshold outside the window of ``2 W`` around an element is at least a span of ``W``
    consecutive gaps away from it (the argument in the module docstring), and one other than the
    nearest is at least half a gap away, so past these temperatures every left-out term is
    clamped: it adds exactly 1 (below; ``sigmoid(30)`` is 1 in float32) or ``exp(-30)`` (above),
    and its gradient is exactly zero, in the full sum as well. Wider windows (4 thresholds
    saturate at half the temperature of 2) are not offered: each window size is one more graph
    for ``torch.compile`` to build, and on the MNIST benchmark's QN W4A4 run the window of 4
    served one epoch for ~23 s of compilation (74 s in all with the window of 2 alone, 97 s with
    both; the same step time). Nor are windows of more than a quarter of the thresholds: picking
    a window's thresholds costs a select per threshold and element, which a half-full window does
    not earn back (a 2-bit quantizer's 3 sigmoids against a window of 2 measured 2.4 -> 2.7 ms,
    compiled).
    """
    count = sorted_biases.shape[-1]
    if count < 2:
        return None
    (smallest_gap,) = gap_statistics(sorted_biases, (1,))
    return saturated_width_for(float(smallest_gap), count, temperature)


def saturated_width_for(smallest_gap: float, count: int, temperature: float) -> int | None:
    """:func:`saturated_width` from the smallest gap between ``count`` sorted thresholds."""
    if count < 2:
        return None
    reach = temperature * smallest_gap
    if reach > 2 * SATURATION:
        return 1
    return 2 if reach > SATURATION and count >= 4 else None


def window_start(scaled: torch.Tensor, sorted_biases: torch.Tensor, width: int,
                 axis: int | None) -> torch.Tensor:
    """The first of the ``width`` sorted thresholds summed for each element, in int32 (no
    gradient): for one threshold the nearest, which is the count of midpoints between adjacent
    thresholds the element reaches; for ``2 W`` the ``W`` reached thresholds nearest it and the
    ``W`` above, moved inside the row at its ends."""
    channels, count = sorted_biases.shape
    axis = axis if channels > 1 else None
    with torch.no_grad():
        if width == 1:
            midpoints = (sorted_biases[:, 1:] + sorted_biases[:, :-1]) / 2
            return threshold_index(scaled, midpoints, axis, torch.int32)
        reached = threshold_index(scaled, sorted_biases, axis, torch.int32)
        return (reached - width // 2).clamp(0, count - width)


def nearest_sum(scaled: torch.Tensor, sorted_biases: torch.Tensor, temperature: torch.Tensor,
                width: int, axis: int | None) -> torch.Tensor:
    """``sum_i sigmoid_term(T * (scaled - b_i))`` from the ``width`` thresholds around each
    element, for a width from :func:`saturated_width`: the clamped full sum's value up to the
    ``exp(-30)`` of each saturated term above the window, and its gradients exactly (in exact
    arithmetic; float32 sums in another order).

    Each window threshold is picked by a chain of selects on the window's start, one per
    threshold: the gradient of a select is a masked sum per threshold, which inductor fuses into
    one pass in a fixed order; a gather's would be a scatter-add (atomic, and slow: a 4-bit
    window with scatter-added threshold gradients made a compiled step 48 -> 107 ms).
    ``sorted_biases`` is (C, n) as in :func:`window_sum`. In eager mode, where each select is a
    pass over the tensor, :func:`window_sum`'s gather is the faster form of the same sum (a 4-bit
    quantizer as above: 57.6 ms with selects, 33.8 gathered, 53.0 for all 15 sigmoids), and is
    what this returns.
    """
    if not torch.compiler.is_compiling():
        return window_sum(scaled, sorted_biases, temperature, width, axis)
    return selected_sum(scaled, sorted_biases, temperature, width, axis)


def selected_sum(scaled: torch.Tensor, sorted_biases: torch.Tensor, temperature: torch.Tensor,
                 width: int, axis: int | None) -> torch.Tensor:
    """:func:`nearest_sum`'s compiled form: the window's thresholds picked by selects (the
    nearest threshold alone by :func:`nearest_staircase`)."""
    channels, count = sorted_biases.shape
    shape = [1] * scaled.dim()
    if channels > 1:
        shape[axis % scaled.dim()] = channels
    if width == 1:
        one = torch.ones(shape, dtype=scaled.dtype, device=scaled.device)
        return nearest_staircase(scaled, sorted_biases, temperature, one, 0, axis)
    columns = [sorted_biases[:, i].reshape(shape) for i in range(count)]
    # The window's start in int32: with int64 arithmetic on it inductor's CPU code for this
    # function took 45-51 ms instead of 5.
    lower = window_start(scaled, sorted_biases, width, axis)
    total = lower.to(scaled.dtype)
    for offset in range(width):
        threshold = None
        for start in range(count - width + 1):
            pick = torch.where(lower == start, columns[start + offset], 0.0)
            threshold = pick if threshold is None else threshold + pick
        total = total + sigmoid_term(temperature * (scaled - threshold))
    return total


def nearest_staircase(scaled: torch.Tensor, sorted_biases: torch.Tensor,
                      temperature: torch.Tensor, scale: torch.Tensor, offset: int,
                      axis: int | None, grid: int | None = None) -> torch.Tensor:
    """``scale * (offset + sum_i sigmoid_term(T * (scaled - b_i)))`` once every sigmoid but the
    nearest threshold's is saturated (:func:`saturated_width` is 1): a QN quantizer's whole soft
    function when its ``scale`` is ``alpha`` and ``offset`` is ``v_0``, evaluated by
    :class:`NearestSigmoid` with the gradients of ``scaled``, ``scale`` and the thresholds written
    out. ``sorted_biases`` is (C, n) as in :func:`window_sum`; ``scale`` broadcasts against
    ``scaled`` and is positive (the scale's gradient divides by it); ``T`` gets no gradient (the
    quantizers hold it as a buffer). ``grid``: an integer ``g`` when the thresholds are exactly
    ``g + 1/2, g + 3/2, ...`` in every row and get no gradient, which makes the nearest one
    ``g + 1/2 + clamp(floor(scaled) - g, 0, n - 1)`` (the midpoints between them are the integers,
    so ``floor`` counts the ones reached exactly); the rows are then not read.

    For torch.compile: differentiated by autograd, the same function made the compiled backward
    pass evaluate each sigmoid again and pick each element's threshold again (torch.compile's
    partitioner keeps the sigmoid's argument rather than its slope, since the scale's gradient
    needs the sigmoid too): a compiled 4-bit activation quantizer on 64x16x28x28, forward and
    backward, 3.48 -> 2.40 ms (its compiled graphs 3.14 -> 1.90; old and new code interleaved in
    one process), a 2-bit one 1.36 -> 1.09.
    """
    channels, count = sorted_biases.shape
    shape = [1] * scaled.dim()
    if channels > 1:
        shape[axis % scaled.dim()] = channels
    columns = []
    if grid is None:
        columns = [sorted_biases[:, i].reshape(shape) for i in range(count)]
    arguments = (scaled, temperature.detach(), scale, float(offset),
                 axis if channels > 1 else None, count, grid, *columns)
    if not torch.compiler.is_compiling():
        return NearestSigmoid.apply(*arguments)
    return checkpoint(NearestSigmoid.apply, *arguments, use_reentrant=False,
                      context_fn=save_everything)


class NearestSigmoid(torch.autograd.Function):
    """:func:`nearest_staircase`: ``scale * (offset + k + sigmoid_term(T * (scaled - b_k)))``
    for the nearest threshold ``b_k`` of each element, ``k`` counting the midpoints between
    adjacent sorted thresholds that it reaches.

    The forward pass keeps ``k``, the sigmoid's slope ``T * s * (1 - s)`` (zero where the clamp
    of :func:`sigmoid_term` holds, as the clamp's gradient is) and the output (which the next
    layer's backward pass keeps anyway) for the backward pass, which is then a multiplication
    and the masked sums of the scale and the thresholds, one pass with no exponential. The
    threshold masks compare ``k`` with ``==`` when there are more thresholds than bytes in a
    float; with fewer (1-2 bits) they are ``1 - |k - i|`` clamped at 0, since the partitioner
    would move those few comparisons into the forward pass and keep their ``bool`` results,
    which inductor's CPU code stores element by element (a 2-bit quantizer took 16.9 ms instead
    of 1.1).

    Arguments: ``scaled``, ``T``, ``scale``, ``offset`` (a number), the channel axis (None per
    tensor), the number of thresholds, ``grid`` (see :func:`nearest_staircase`; None: compare) and
    the sorted thresholds as columns, each shaped to broadcast against ``scaled`` (none on a
    grid). Columns that need no gradient get no masked sums, and ``k`` is then not kept.
    """

    @staticmethod
    def forward(ctx, scaled, temperature, scale, offset, axis, count, grid, *columns):
        if grid is not None:
            lower = (scaled.floor() - grid).clamp(0, count - 1)
            nearest = lower + (grid + 0.5)
        else:
            lower = torch.zeros_like(scaled)
            nearest = columns[0].expand(scaled.shape)
            for below, above in zip(columns[:-1], columns[1:]):
                reached = scaled >= (below + above) / 2
                lower = lower + torch.where(reached, 1.0, 0.0)
                nearest = torch.where(reached, above, nearest)
        argument = temperature * (scaled - nearest)
        sigmoid = sigmoid_term(argument)
        slope = torch.where(argument.abs() < SATURATION,
                            temperature * sigmoid * (1.0 - sigmoid), 0.0)
        out = scale * (lower + sigmoid + offset)
        kept = [lower] if any(ctx.needs_input_grad[7:]) else []
        ctx.save_for_backward(slope, scale, out, *kept)
        ctx.axis, ctx.count = axis, len(columns)
        return out

    @staticmethod
    def backward(ctx, grad):
        slope, scale, out, *kept = ctx.saved_tensors
        dims = list(range(grad.dim()))
        if ctx.axis is not None:
            dims.remove(ctx.axis % grad.dim())
        grad_scale = None
        if ctx.needs_input_grad[2]:
            grad_scale = (grad * out).sum(dim=dims, keepdim=True) / scale
        grad_scaled = grad * scale * slope
        if not kept:
            return grad_scaled, None, grad_scale, None, None, None, None, *[None] * ctx.count
        (lower,) = kept
        if ctx.count > lower.element_size():
            picks = [torch.where(lower == k, grad_scaled, 0.0) for k in range(ctx.count)]
        else:
            picks = [grad_scaled * (1.0 - (lower - k).abs()).clamp_min(0.0)
                     for k in range(ctx.count)]
        grad_columns = [-pick.sum(dim=dims, keepdim=True) for pick in picks]
        return grad_scaled, None, grad_scale, None, None, None, None, *grad_columns


def _must_save(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE


save_everything = functools.partial(create_selective_checkpoint_contexts, _must_save)
"""A selective-checkpoint context that forbids torch.compile's partitioner to recompute anything
in it: a backward pass then reads what the forward saved for it."""
