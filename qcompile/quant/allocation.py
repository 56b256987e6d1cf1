"""Choosing per-layer bit-widths under a budget: an exact integer program.

Each layer ``i`` takes one bit-width ``b`` from the choices; ``x[i, b]`` is 1 for the chosen one.
Minimise total sensitivity ``sum Omega_i(b) x[i, b]`` subject to ``sum cost_i(b) x[i, b] <= budget``
and one choice per layer (HAWQ-V3, Yao et al. 2021, sec. 3.3, solved here with SciPy's MILP
solver, HiGHS). Layers with a fixed width (first and last) keep it and use up budget.
"""

from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from qcompile.errors import ConfigError


def allocate_bits(
    sensitivity: Sequence[dict[int, float]],
    cost: Sequence[dict[int, float]],
    budget: float,
    fixed: dict[int, int] | None = None,
) -> list[int]:
    """The bit-width per layer minimising total sensitivity with total cost within ``budget``.

    ``sensitivity[i][b]`` and ``cost[i][b]`` give layer ``i``'s value at ``b`` bits; ``fixed``
    maps layer index to a width it must take. Raises ConfigError if no assignment fits.
    """
    fixed = fixed or {}
    variables = [(i, b) for i, options in enumerate(sensitivity) for b in sorted(options)
                 if i not in fixed or b == fixed[i]]
    for i, b in fixed.items():
        if b not in sensitivity[i]:
            raise ConfigError(f"layer {i} is fixed at {b} bits, which is not among its choices")
    objective = np.array([sensitivity[i][b] for i, b in variables])
    cost_row = np.array([cost[i][b] for i, b in variables])
    layers = len(sensitivity)
    one_each = np.zeros((layers, len(variables)))
    for column, (i, _) in enumerate(variables):
        one_each[i, column] = 1.0
    minimum = sum(min(cost[i][b] for b in sensitivity[i] if i not in fixed or b == fixed[i])
                  for i in range(layers))
    if minimum > budget * (1 + 1e-12):
        raise ConfigError(
            f"no bit assignment fits the budget: the smallest possible total is {minimum:.4g} "
            f"against a budget of {budget:.4g}; raise the budget or allow fewer bits"
        )
    result = milp(
        objective,
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(cost_row[None], -np.inf, budget)],
        integrality=np.ones(len(variables)),
        bounds=Bounds(0, 1),
    )
    if not result.success:
        raise ConfigError(f"bit allocation failed: {result.message}")
    chosen = [0] * layers
    for column, (i, b) in enumerate(variables):
        if result.x[column] > 0.5:
            chosen[i] = b
    return chosen
