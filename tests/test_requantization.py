"""Threshold requantization equals the float requantization it replaces (hypothesis)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.quant.base import IntegerSpec
from qcompile.requantization import (
    apply_fixed_point,
    apply_staircase,
    decision_thresholds,
    fixed_point,
    staircase,
)

BOUND = 3000
SETTINGS = settings(max_examples=60, deadline=None)


def dyadic(scale_bits: int = 6, low: int = -400, high: int = 400):
    """Numbers ``k / 2^scale_bits``: float64 arithmetic on them below is exact, ties included."""
    return st.integers(low, high).map(lambda k: k / 2**scale_bits)


@st.composite
def float_chain(draw):
    """Per-channel scales (negative and zero included) and biases, thresholds with zero-width
    intervals, an optional clamp."""
    channels = draw(st.integers(1, 4))
    scale = torch.tensor(draw(st.lists(dyadic(8, -64, 64), min_size=channels, max_size=channels)),
                         dtype=torch.float64)
    bias = torch.tensor(draw(st.lists(dyadic(), min_size=channels, max_size=channels)),
                        dtype=torch.float64)
    count = draw(st.integers(1, 7))
    steps = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0]), min_size=count,
                          max_size=count))
    start = draw(dyadic())
    thresholds = torch.tensor([start + sum(steps[:k + 1]) for k in range(count)],
                              dtype=torch.float64).reshape(1, -1)
    low = draw(st.sampled_from([-math.inf, 0.0, -1.0]))
    high = draw(st.sampled_from([math.inf, 6.0, 2.5]))
    return scale, bias, thresholds, low, high


def accumulators(channels: int) -> torch.Tensor:
    return torch.arange(-BOUND, BOUND + 1).reshape(-1, 1).expand(-1, channels).contiguous()


@SETTINGS
@given(float_chain())
def test_staircase_counts_the_thresholds_the_float_value_reaches(chain):
    scale, bias, thresholds, low, high = chain
    v = accumulators(len(scale))
    y = (v.double() * scale + bias).clamp(low, high)
    expected = (y.unsqueeze(-1) >= thresholds[0]).sum(-1)
    integer, direction = staircase(scale, bias, thresholds, BOUND, low, high)
    assert integer.dtype == torch.int64
    assert bool((integer[:, 1:] >= integer[:, :-1]).all())
    assert torch.equal(apply_staircase(v, integer, direction), expected)


@st.composite
def quantizer_specs(draw):
    bits = draw(st.integers(1, 8))
    scale = draw(st.floats(1e-3, 2.0))
    if draw(st.booleans()):
        count = 2**bits
        first = draw(st.sampled_from([0, -(count // 2)]))
        return IntegerSpec(bits, torch.arange(first, first + count), torch.tensor([scale]),
                           torch.tensor([0]))
    count = draw(st.integers(1, 2**bits - 1))
    gaps = draw(st.lists(st.floats(0.0, 1.0), min_size=count, max_size=count))
    thresholds = torch.tensor(gaps).cumsum(0) - draw(st.floats(0.0, 3.0))
    return IntegerSpec(bits, torch.arange(count + 1), torch.tensor([scale]),
                       torch.tensor([0]), thresholds=thresholds)


@SETTINGS
@given(quantizer_specs(), st.lists(st.floats(-0.05, 0.05), min_size=1, max_size=3),
       st.floats(-2.0, 2.0), st.sampled_from([(-math.inf, math.inf), (0.0, math.inf),
                                              (0.0, 6.0)]))
def test_staircase_equals_quantizing_the_float_value(spec, scales, bias, clamp):
    """On random (non-dyadic) scales and biases, away from rounding ties, the integer staircase
    gives the quantizer's own code for every accumulator."""
    scale = torch.tensor(scales, dtype=torch.float64)
    bias = torch.full_like(scale, bias)
    v = accumulators(len(scale))
    y = (v.double() * scale + bias).clamp(*clamp)
    expected = torch.searchsorted(spec.codes, spec.quantize(y).contiguous())
    integer, direction = staircase(scale, bias, decision_thresholds(spec), BOUND, *clamp)
    codes = apply_staircase(v, integer, direction)
    t = decision_thresholds(spec).reshape(-1)
    tie = ((y.unsqueeze(-1) - t).abs() <= 1e-9 * (y.abs().unsqueeze(-1) + 1)).any(-1)
    assert torch.equal(codes[~tie], expected[~tie])
    assert int((codes - expected).abs().max()) <= 1


@SETTINGS
@given(st.floats(1e-4, 0.5), st.floats(-3.0, 3.0), st.integers(1, 8),
       st.sampled_from([1, -1]))
def test_fixed_point_form_equals_the_staircase_on_the_whole_range(ratio, bias, bits, sign):
    """When a fixed-point form is found it gives the staircase's code for every accumulator."""
    spec = IntegerSpec(bits, torch.arange(2**bits), torch.tensor([1.0]), torch.tensor([0]))
    scale = torch.tensor([sign * ratio], dtype=torch.float64)
    integer, direction = staircase(scale, torch.tensor([bias], dtype=torch.float64),
                                   decision_thresholds(spec), BOUND, 0.0)
    found = fixed_point(integer, BOUND)
    assert found is not None, "a uniform staircase has a fixed-point form"
    assert found.start is None, "the line alone fits a staircase whose thresholds are distinct"
    v = accumulators(1)
    assert torch.equal(apply_fixed_point(v, direction, found.multiplier, found.offset,
                                         found.shift, 2**bits - 1),
                       apply_staircase(v, integer, direction))


@SETTINGS
@given(st.lists(st.floats(1e-4, 0.5), min_size=1, max_size=4), st.floats(-3.0, 3.0),
       st.integers(2, 8), st.sampled_from([1, -1]), st.floats(-2.0, 2.0))
def test_fixed_point_after_a_clamp_starts_at_the_first_threshold(ratios, bias, bits, sign, low):
    """A ReLU (any clamp) into a quantizer whose zero point sits mid-range lands the codes below
    it on one threshold; the fixed-point form then needs ``start``, and stays exact."""
    spec = IntegerSpec(bits, torch.arange(2**bits), torch.tensor([0.25]),
                       torch.tensor([2 ** (bits - 1)]))
    scale = sign * torch.tensor(ratios, dtype=torch.float64)
    integer, direction = staircase(scale, torch.tensor([bias], dtype=torch.float64),
                                   decision_thresholds(spec), BOUND, low)
    found = fixed_point(integer, BOUND)
    assert found is not None
    v = accumulators(len(ratios))
    assert torch.equal(found.apply(v, direction, 2**bits - 1),
                       apply_staircase(v, integer, direction))


@pytest.mark.parametrize("seed", range(4))
def test_fixed_point_covers_a_wide_accumulator_range(seed):
    """8-bit staircases over accumulators up to 1.7e6 (a 3x7x7 8-bit first layer) need shifts
    past 31 to resolve their slopes (31 found 7 of 40 such); found, each is exact at every
    threshold and either side. (Ratios drawn at random: a ratio whose thresholds fall on exact
    integers in float64 can round into a pattern no line makes.)"""
    bound = 1_710_720
    spec = IntegerSpec(8, torch.arange(256), torch.tensor([1.0]), torch.tensor([0]))
    rng = np.random.default_rng(seed)
    for _ in range(10):
        scale = torch.tensor([rng.choice([1, -1]) * rng.uniform(1e-4, 1e-3)], dtype=torch.float64)
        integer, direction = staircase(scale, torch.tensor([rng.uniform(-3, 3)]),
                                       decision_thresholds(spec), bound, 0.0)
        found = fixed_point(integer, bound)
        assert found is not None, "a uniform staircase has a fixed-point form"
        t = integer[0][(integer[0] > -bound) & (integer[0] <= bound)]
        v = torch.cat([t - 1, t, t + 1, torch.tensor([-bound, bound])]).clamp(-bound, bound)
        v = v.reshape(-1, 1)
        assert torch.equal(found.apply(v, direction, 255), apply_staircase(v, integer, direction))


def test_fixed_point_refuses_a_non_uniform_staircase():
    integer = torch.tensor([[0, 1, 50, 51, 400]])
    assert fixed_point(integer, BOUND) is None


def test_relu_into_a_mid_range_zero_point_needs_start_and_floor():
    """ReLU into a 3-bit quantizer with zero point 4: codes 0-3 are never reached (always passed),
    4 holds on the whole negative range, and one accumulator step moves two codes."""
    integer = torch.tensor([[-BOUND - 1] * 4 + [1, 1, 2]])
    direction = torch.tensor([1])
    found = fixed_point(integer, BOUND)
    assert found is not None and found.start is not None
    assert found.floor.tolist() == [4]
    v = accumulators(1)
    assert torch.equal(found.apply(v, direction, 7), apply_staircase(v, integer, direction))
