"""What a layer kernel does with its int32 accumulator before storing it: the requantization.

Shared by the bit-serial and the direct kernels and by the standalone requantize kernel, so the
three compute the same integers as :mod:`qcompile.requantization` (the reference):

- ``none``: store the accumulator;
- ``thresholds``: ``code = #{t : direction * acc >= thresholds[row, t]}`` (extra inputs
  ``thresholds`` (rows, n), int64 or, with ``table="int32"``, int32, and ``direction`` int64
  (rows,)), counted one by one for a few thresholds and group by group for many. Integer
  thresholds lie within one of the accumulator's range (:func:`qcompile.requantization.
  staircase`), so an int32 accumulator's table fits int32: half the bytes to store and read;
- ``fixed_point``: ``code = clamp((direction * acc * multiplier + offset) >> shift, 0, n)`` in
  int64 (extra inputs ``multiplier``, ``offset``, ``direction``, int64 (rows,)); with ``start``,
  ``clamp(..., floor, n)`` where ``direction * acc >= start`` and 0 below (two more int64
  (rows,) inputs, ``start`` and ``floor``: :class:`qcompile.requantization.FixedPoint`).

``rows`` is the output channel count when ``per_channel``, else 1. Codes are stored as int32.
"""

from dataclasses import dataclass

from tvm import te, tirx

KINDS = ("none", "thresholds", "fixed_point")
TABLES = ("int64", "int32")
LINEAR_LEVELS = 16
"""Up to this many thresholds are compared one by one; more are searched in two levels."""
GROUP = 16


@dataclass(frozen=True)
class Epilogue:
    kind: str = "none"
    levels: int = 0
    per_channel: bool = True
    shift: int = 0
    start: bool = False
    table: str = "int64"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"epilogue kind must be one of {KINDS}, got {self.kind!r}")
        if self.table not in TABLES:
            raise ValueError(f"epilogue table must be one of {TABLES}, got {self.table!r}")

    def placeholders(self, channels: int) -> list[te.Tensor]:
        """The extra kernel inputs this epilogue reads, in order."""
        rows = channels if self.per_channel else 1
        if self.kind == "thresholds":
            return [te.placeholder((rows, self.levels), self.table, name="thresholds"),
                    te.placeholder((rows,), "int64", name="direction")]
        if self.kind == "fixed_point":
            names = ["multiplier", "offset", "direction"] + (["start", "floor"] if self.start
                                                             else [])
            return [te.placeholder((rows,), "int64", name=name) for name in names]
        return []

    @property
    def tag(self) -> str:
        """A short name for kernel symbols."""
        if self.kind == "none":
            return "acc"
        rows = "c" if self.per_channel else "t"
        shift = self.shift if self.kind == "fixed_point" else ""
        narrow = "i32" if self.kind == "thresholds" and self.table == "int32" else ""
        return f"{self.kind[0]}{self.levels}{rows}{shift}{'s' if self.start else ''}{narrow}"


def apply_epilogue(acc: te.Tensor, epilogue: Epilogue, extra: list[te.Tensor],
                   channel_axis: int = 1, name: str = "requantized") -> te.Tensor:
    """The epilogue's TE compute over ``acc`` (int32, channels on ``channel_axis``)."""
    if epilogue.kind == "none":
        return acc
    return te.compute(acc.shape, lambda *index: epilogue_code(
        acc(*index), epilogue, extra, index[channel_axis]), name=name)


def epilogue_code(value, epilogue: Epilogue, extra, channel):
    """The int32 the epilogue stores for the int32 sum ``value`` of output channel
    ``channel``; ``extra`` are its inputs (TE tensors or TIR buffers)."""
    if epilogue.kind == "none":
        return value
    r = channel if epilogue.per_channel else 0
    if epilogue.kind == "thresholds":
        thresholds, direction = extra
        signed = value.astype("int64") * direction[r]
        threshold = lambda k: thresholds[r, k].astype("int64")  # noqa: E731 (int32 tables)
        if epilogue.levels > LINEAR_LEVELS:
            return count_reached(signed, threshold, epilogue.levels)
        total = tirx.const(0, "int32")
        for k in range(epilogue.levels):
            total = total + (signed >= threshold(k)).astype("int32")
        return total
    multiplier, offset, direction = extra[:3]
    signed = value.astype("int64") * direction[r]
    shifted = tirx.shift_right(signed * multiplier[r] + offset[r],
                               tirx.const(epilogue.shift, "int64"))
    low = extra[4][r] if epilogue.start else tirx.const(0, "int64")
    code = tirx.max(tirx.min(shifted, tirx.const(epilogue.levels, "int64")),
                    low).astype("int32")
    if not epilogue.start:
        return code
    return tirx.Select(signed >= extra[3][r], code, tirx.const(0, "int32"))


def count_reached(value, threshold, levels: int):
    """``#{k : value >= threshold(k)}`` for ``levels`` non-decreasing thresholds, ``threshold``
    giving the ``k``-th as an expression, in two levels: count the groups of :data:`GROUP`
    thresholds reached whole (compare with each group's last threshold), then count within the
    next group: ``2 sqrt(levels)``-ish compares, not ``levels``."""
    groups = levels // GROUP
    whole = tirx.const(0, "int32")
    for g in range(groups):
        whole = whole + (value >= threshold(g * GROUP + GROUP - 1)).astype("int32")
    total = whole * GROUP
    for i in range(GROUP):
        index = whole * GROUP + i
        inside = index < levels
        safe = tirx.if_then_else(inside, index, levels - 1)
        total = total + tirx.all(inside, value >= threshold(safe)).astype("int32")
    return total
