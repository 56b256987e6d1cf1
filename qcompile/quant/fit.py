"""Fitting a quantizer's starting point to data: 1-D k-means and a search over rounding steps.

A learnable quantizer trains well at 2 bits only from a good start. These helpers work on
``rows``: a (C, M) matrix with one row per channel (a single row for a per-tensor quantizer), as
:meth:`qcompile.quant.base.Quantizer.channel_rows` gives it. Everything is vectorized over rows.
"""

import torch

SAMPLE_LIMIT = 8192
SEARCH_POINTS = 64
ACTIVATION_PEAK = 0.999
"""Quantile of activation magnitudes up to which clip levels are searched (see best_steps)."""


def sample_columns(rows: torch.Tensor, limit: int = SAMPLE_LIMIT) -> torch.Tensor:
    """At most ``limit`` evenly strided columns of ``rows`` (deterministic, keeps the spread)."""
    stride = -(-rows.shape[1] // limit)
    return rows[:, ::stride] if stride > 1 else rows


def kmeans_1d(rows: torch.Tensor, k: int, iterations: int = 30) -> torch.Tensor:
    """Sorted centroids (C, k) of Lloyd's k-means on each row, started at evenly spaced quantiles.

    In one dimension the clusters are intervals, so assignment is a binary search against the
    midpoints between centroids. A cluster left empty keeps its previous centroid.
    """
    rows = sample_columns(rows).to(torch.float64)
    probs = (torch.arange(k, dtype=rows.dtype) + 0.5) / k
    centers = torch.quantile(rows, probs, dim=1).T.contiguous()
    ones = torch.ones_like(rows)
    for _ in range(iterations):
        bounds = ((centers[:, 1:] + centers[:, :-1]) / 2).contiguous()
        index = torch.searchsorted(bounds, rows.contiguous())
        sums = torch.zeros_like(centers).scatter_add_(1, index, rows)
        counts = torch.zeros_like(centers).scatter_add_(1, index, ones)
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
        moved = moved.sort(dim=1).values
        if torch.equal(moved, centers):
            break
        centers = moved
    return centers


def candidate_steps(peak: torch.Tensor, top_code: int, points: int = SEARCH_POINTS) -> torch.Tensor:
    """Rounding steps (2 * points, C) whose top code ``top_code`` lands on a fraction of ``peak``.

    The fractions run evenly from ``1 / points`` to 1 of each row's peak magnitude, and
    geometrically from ``2^-16`` to ``1 / points``, so a lone outlier that sets the peak does not
    hide the small clip the rest of the data wants.
    """
    linear = torch.arange(1, points + 1, dtype=peak.dtype) / points
    geometric = torch.logspace(-16, -torch.log2(torch.tensor(float(points))).item(), points,
                               base=2.0, dtype=peak.dtype)[:-1]
    fractions = torch.cat([geometric, linear])
    tiny = torch.finfo(peak.dtype).tiny
    return fractions[:, None] * peak.clamp_min(tiny)[None, :] / max(top_code, 1)


def rounding_errors(rows: torch.Tensor, steps: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Mean squared error (points, C) of ``clamp(round(x / s), qmin, qmax) * s`` on each row.

    ``steps`` is (points, C), or (points, 1) for one step shared by every row.
    """
    errors = []
    for step in steps:
        step = step[:, None]
        quantized = torch.clamp(torch.round(rows / step), qmin, qmax) * step
        errors.append((quantized - rows).pow(2).mean(dim=1))
    return torch.stack(errors)


def best_steps(rows: torch.Tensor, qmin: int, qmax: int, peak_quantile: float = 1.0) -> torch.Tensor:
    """The step (C,) of least squared rounding error for each row, from :func:`candidate_steps`.

    The candidates reach up to each row's peak magnitude, or with ``peak_quantile < 1`` up to that
    quantile of the magnitudes, values beyond it counted as at it: for activations, whose rare
    extremes would otherwise pull a squared-error fit to a clip that leaves everything else in one
    level. Ties go to the larger step (all-zero data keeps the whole range).
    """
    largest = rows.abs().amax(dim=1)
    rows = sample_columns(rows)
    if peak_quantile < 1.0:
        peak = torch.quantile(rows.abs().to(torch.float64), peak_quantile, dim=1).to(rows.dtype)
        peak = torch.where(peak > 0, peak, largest)
        rows = torch.maximum(torch.minimum(rows, peak[:, None]), -peak[:, None])
    else:
        peak = largest
    steps = candidate_steps(peak, max(qmax, -qmin))
    errors = rounding_errors(rows, steps, qmin, qmax).flip(0)
    return steps.flip(0).gather(0, errors.argmin(dim=0, keepdim=True))[0]
