"""Shared pieces of the kernel tests: random epilogues with their reference, and running a
PrimFunc with guard words around its output."""

import numpy as np
import torch
import tvm
from hypothesis import strategies as st

from qcompile.backends.tvm.kernels.epilogue import Epilogue
from qcompile.requantization import apply_fixed_point, apply_staircase

KINDS = ("none", "thresholds", "fixed_point")


@st.composite
def epilogues(draw, channels: int, bound: int, kinds=KINDS,
              levels=st.sampled_from((1, 3, 15, 255))):
    """An epilogue (of one of ``kinds``, with a count of ``levels``), its inputs (int64, and the
    thresholds int64 or int32), and the reference requantization of the accumulator."""
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return Epilogue("none"), [], lambda acc: acc
    levels = draw(levels)
    rows = channels if draw(st.booleans()) else 1
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    direction = rng.choice([-1, 1], rows).astype(np.int64)
    if kind == "thresholds":
        table = draw(st.sampled_from(("int64", "int32")))
        thresholds = np.sort(rng.integers(-bound, bound + 1, (rows, levels)), axis=1)
        extra = [thresholds.astype(table), direction]
        return (Epilogue("thresholds", levels, rows > 1, table=table), extra,
                lambda acc: apply_staircase(acc, torch.from_numpy(thresholds),
                                            torch.from_numpy(direction)))
    shift = draw(st.integers(0, 24))
    multiplier = rng.integers(1, 2**16, rows).astype(np.int64)
    offset = rng.integers(-(2**24), 2**24, rows).astype(np.int64)
    extra = [multiplier, offset, direction]
    if draw(st.booleans()):
        floored = [rng.integers(-bound, bound + 1, rows).astype(np.int64),
                   rng.integers(0, levels + 1, rows).astype(np.int64)]
        return (Epilogue("fixed_point", levels, rows > 1, shift, True), extra + floored,
                lambda acc: apply_fixed_point(
                    acc, *map(torch.from_numpy, (direction, multiplier, offset)), shift, levels,
                    *map(torch.from_numpy, floored)))
    return (Epilogue("fixed_point", levels, rows > 1, shift), extra,
            lambda acc: apply_fixed_point(acc, *map(torch.from_numpy, (direction, multiplier,
                                                                       offset)), shift, levels))


GUARD = 64
"""int32 words on each side of a CPU kernel's output that must stay untouched."""


def run(func: tvm.tirx.PrimFunc, target, arrays: list[np.ndarray], out_shape) -> np.ndarray:
    """The kernel's output; on the CPU the output lies inside a larger buffer, and a write
    past either end fails the test."""
    executable = tvm.compile(tvm.IRModule({"main": func}), target)
    kernel = executable.mod[func.attrs["global_symbol"]]
    if target.kind.name == "cuda":
        args = [tvm.runtime.tensor(a, tvm.cuda(0)) for a in arrays]
        out = tvm.runtime.tensor(np.zeros(out_shape, np.int32), tvm.cuda(0))
        kernel(*args, out)
        return out.numpy()
    size = int(np.prod(out_shape))
    buffer = torch.full((size + 2 * GUARD,), -12345, dtype=torch.int32)
    out = buffer[GUARD:GUARD + size].view(out_shape)
    kernel(*[tvm.runtime.tensor(a) for a in arrays], tvm.runtime.from_dlpack(out))
    assert bool((buffer[:GUARD] == -12345).all() and (buffer[GUARD + size:] == -12345).all()), \
        "the kernel wrote outside its output"
    return out.numpy().copy()
