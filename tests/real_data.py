"""Real data for tests, loaded once per process: the 8x8 digits that scikit-learn ships."""

import functools

from qcompile.data import Split, load_builtin


@functools.cache
def digits() -> Split:
    return load_builtin("digits")


def digits_calibration(count: int = 64) -> list[tuple]:
    """Calibration batches: the first ``count`` training digits, as one batch."""
    return [(digits().train_x[:count],)]
