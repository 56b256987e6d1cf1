"""Quantization Networks' sigmoid sum over a window of thresholds: within its bound of the full sum."""

import re

import pytest
import torch
import torch._dynamo
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code

from qcompile.quant import make_quantizer
from qcompile.quant.base import threshold_index
from qcompile.quant.sigmoid_window import (
    SATURATION,
    sigmoid_term,
    HALF_WIDTHS,
    choose_half_width,
    nearest_staircase,
    saturated_width,
    selected_sum,
    truncation_bound,
    window_sum,
)


def full_sum(scaled, biases, temperature, axis):
    """The paper's sum over every threshold; ``biases`` (C, n) along ``axis`` of ``scaled``."""
    shape = [1] * scaled.dim() + [biases.shape[-1]]
    if biases.shape[0] > 1:
        shape[axis] = biases.shape[0]
    return torch.sigmoid(temperature * (scaled.unsqueeze(-1) - biases.reshape(shape))).sum(-1)


def random_thresholds(seed, channels, count, jitter):
    gen = torch.Generator().manual_seed(seed)
    even = torch.arange(count, dtype=torch.float64) - count / 2 + 0.5
    noisy = even + jitter * torch.randn(channels, count, generator=gen, dtype=torch.float64)
    return noisy.sort(dim=-1).values


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), channels=st.sampled_from([1, 3]),
       count=st.sampled_from([31, 63, 255]), jitter=st.floats(0.0, 0.45),
       temperature=st.floats(0.5, 300.0), half_width=st.sampled_from(HALF_WIDTHS[:4]))
def test_window_sum_is_within_its_bound_of_the_full_sum(seed, channels, count, jitter,
                                                        temperature, half_width):
    if 2 * half_width >= count:
        return
    biases = random_thresholds(seed, channels, count, jitter)
    gen = torch.Generator().manual_seed(seed + 1)
    scaled = (count * 0.7) * (torch.rand(4, channels, 5, generator=gen, dtype=torch.float64)
                              - 0.5)
    axis = 1 if channels > 1 else None
    t = torch.tensor(temperature, dtype=torch.float64)
    error = (window_sum(scaled, biases, t, 2 * half_width, axis)
             - full_sum(scaled, biases, t, 1)).abs().max().item()
    assert error <= truncation_bound(biases, temperature, half_width) + 1e-9


def test_bound_is_tight_enough_to_matter_and_an_error_past_the_window_shows():
    """Evenly spaced thresholds at T = 1: W = 4 misses about exp(-4) per side (above tolerance),
    W = 16 is within 1e-4 of a step, and the chosen window is the smallest that is."""
    biases = random_thresholds(0, 1, 255, 0.0)
    scaled = torch.linspace(-140, 140, 2001, dtype=torch.float64)
    t = torch.tensor(1.0, dtype=torch.float64)
    exact = full_sum(scaled, biases, t, 0)
    coarse = (window_sum(scaled, biases, t, 8, None) - exact).abs().max().item()
    assert 1e-2 < coarse <= truncation_bound(biases, 1.0, 4)
    chosen = choose_half_width(biases, 1.0)
    assert chosen == 16
    assert (window_sum(scaled, biases, t, 2 * chosen, None) - exact).abs().max().item() <= 1e-4
    assert choose_half_width(biases, 50.0) == 2


def test_crowded_thresholds_widen_the_window_or_fall_back_to_the_full_sum():
    biases = random_thresholds(0, 1, 255, 0.0)
    crowded = biases.clone()
    crowded[0, 100:140] = 0.0
    assert choose_half_width(crowded.sort(-1).values, 1.0) == 64
    crowded[0, 50:200] = 0.0
    assert choose_half_width(crowded.sort(-1).values, 1.0) is None


def test_gradients_match_the_full_sum_within_the_bound():
    biases = random_thresholds(3, 2, 63, 0.3).requires_grad_(True)
    scaled = (40 * (torch.rand(6, 2, 7, dtype=torch.float64) - 0.5)).requires_grad_(True)
    t = torch.tensor(2.0, dtype=torch.float64)
    half_width = choose_half_width(biases.detach(), 2.0)
    assert half_width is not None and 2 * half_width < 63
    weights = torch.rand(6, 2, 7, dtype=torch.float64)
    grads = []
    for total in (window_sum(scaled, biases, t, 2 * half_width, 1),
                  full_sum(scaled, biases, t, 1)):
        grads.append(torch.autograd.grad((weights * total).sum(), (scaled, biases)))
    bound = 2.0 * truncation_bound(biases.detach(), 2.0, half_width)
    assert (grads[0][0] - grads[1][0]).abs().max().item() <= bound
    assert (grads[0][1] - grads[1][1]).abs().max().item() <= bound * weights.numel()


def test_eight_bit_quantizer_soft_forward_uses_the_window_and_stays_within_tolerance():
    q = make_quantizer("qn", "activation", 8, signed=False).double()
    x = torch.rand(4000, dtype=torch.float64) * 3
    q.initialize(x)
    with torch.no_grad():
        q.biases.add_(0.2 * torch.randn_like(q.biases))
    q.train()
    alpha, beta = q.scales()
    full = alpha * full_sum(beta * x, q.biases.detach(), q.temperature, 0)
    assert (q(x) - full).abs().max().item() <= 1e-4 * alpha.item()
    assert choose_half_width(q.biases.detach().sort(-1).values, 1.0) is not None


def test_refresh_window_is_what_a_compiled_forward_reads():
    q = make_quantizer("qn", "weight", 8, signed=True, per_channel=True, channels=3)
    w = torch.randn(3, 40)
    q.initialize(w)
    q.train()
    assert q.soft_window is None
    q.refresh_window()
    assert q.soft_window == 2 * choose_half_width(q.biases.detach().sort(-1).values, 1.0)
    torch._dynamo.reset()  # the suite's other compiled quantizers count against the limit of 8
    compiled = torch.compile(q, dynamic=False, fullgraph=True)
    torch.testing.assert_close(compiled(w), q(w), rtol=0, atol=1e-5)
    for temperature, width in ((40.0, 4), (80.0, 1)):
        q.set_temperature(temperature)
        q.refresh_window()
        assert q.soft_window == width
        torch.testing.assert_close(compiled(w), q(w), rtol=0, atol=1e-5)


def test_two_bit_quantizer_sums_the_nearest_threshold_alone_only_compiled_and_saturated():
    q = make_quantizer("qn", "activation", 2, signed=False)
    q.refresh_window()
    assert q.soft_window is None
    q.set_temperature(90.0)
    q.refresh_window()
    assert q.soft_window == 1
    assert q.window_width() is None  # eager: the full sum


def test_refresh_chooses_from_the_parameters_and_temperature_alone():
    """What a compiled step reads is what eager mode would choose, whatever was chosen before
    (a resumed run must choose what the uninterrupted one did)."""
    q = make_quantizer("qn", "activation", 8, signed=False)
    q.initialize(torch.rand(1000) * 4)
    for temperature, expected in ((1.0, 32), (3.0, 8), (1.0, 32)):
        q.set_temperature(temperature)
        q.soft_window = 128
        q.refresh_window()
        assert q.soft_window == expected


def test_quantizers_window_once_the_temperature_allows_and_three_bit_never():
    """6 bits: within the truncation bound's tolerance, then the nearest threshold alone once
    every other sigmoid is saturated; 4 bits: only once everything outside the window of 2 is
    saturated (a step apart: T > 30), then the nearest alone (T > 60); 3 bits: never; 2 bits: the
    nearest alone from T > 60, compiled."""
    x = torch.rand(3000, dtype=torch.float64) * 2
    temperatures = (1.0, 3.0, 20.0, 40.0, 80.0)
    for bits, windows in ((6, (32, 8, 4, 4, 1)), (4, (None, None, None, 2, 1)),
                          (3, (None, None, None, None, None)), (2, (None, None, None, None, 1))):
        q = make_quantizer("qn", "activation", bits, signed=False).double()
        q.initialize(x)
        q.train()
        alpha, beta = q.scales()
        for temperature, expected in zip(temperatures, windows, strict=True):
            q.set_temperature(temperature)
            q.refresh_window()
            assert q.soft_window == expected
            full = alpha * full_sum(beta * x, q.biases.detach(), q.temperature, 0)
            assert (q(x) - full).abs().max().item() <= 1e-4 * alpha.item()


@pytest.mark.parametrize("compiled", [False, True])
def test_threshold_gradients_are_the_same_every_time_with_two_threads(compiled):
    """The window's threshold gradients are summed in a fixed order: a scatter-add over two
    threads (``index_put_`` eager, atomic adds compiled) differed in the last bits run to run,
    so a resumed run could not reproduce the uninterrupted one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q = make_quantizer("qn", "activation", 8, signed=False)
        x = torch.rand(64, 512, generator=torch.Generator().manual_seed(0)) * 3
        q.initialize(x)
        q.train()
        q.refresh_window()
        forward = torch.compile(q, dynamic=False) if compiled else q
        grads = []
        for _ in range(4):
            q.zero_grad()
            forward(x).pow(2).sum().backward()
            grads.append(q.biases.grad.clone())
        assert all(torch.equal(grads[0], grad) for grad in grads)
        biases = q.biases.detach().double().requires_grad_(True)
        alpha, beta = (v.detach().double() for v in q.scales())
        soft = alpha * (full_sum(beta * x.double(), biases, q.temperature.double(), 0))
        reference = torch.autograd.grad(soft.pow(2).sum(), biases)[0]
        torch.testing.assert_close(grads[0].double(), reference, rtol=1e-3, atol=1e-3)
    finally:
        torch.set_num_threads(threads)


@settings(max_examples=20, deadline=None)
@given(st.floats(1e-12, 1.0), st.floats(0.0, 1.0))
def test_sigmoid_terms_and_their_gradients_stay_normal(grad, offset):
    """A saturated term never goes subnormal, nor does its gradient times an ordinary upstream
    gradient (subnormal arithmetic is tens of times slower on x86); unsaturated, it is the
    sigmoid bit for bit, and saturated, within 1e-13 of it."""
    z = (torch.linspace(-300, 300, 60001) + offset).requires_grad_(True)
    term = sigmoid_term(z)
    (term * grad).sum().backward()
    smallest_normal = torch.finfo(torch.float32).tiny
    assert bool(((term == 0) | (term.abs() >= smallest_normal)).all())
    assert bool(((z.grad == 0) | (z.grad.abs() >= smallest_normal)).all())
    plain = torch.sigmoid(z.detach())
    inside = z.detach().abs() <= SATURATION
    assert torch.equal(term[inside], plain[inside])
    assert float((term.detach() - plain).abs().max()) <= 1e-13


def clamped_full_sum(scaled, biases, temperature, axis):
    """The full sum with each term clamped as :func:`sigmoid_term` clamps it (what QN trains)."""
    shape = [1] * scaled.dim() + [biases.shape[-1]]
    if biases.shape[0] > 1:
        shape[axis] = biases.shape[0]
    return sigmoid_term(temperature * (scaled.unsqueeze(-1) - biases.reshape(shape))).sum(-1)


def value_and_gradients(form, scaled, biases, temperature, width, weights):
    scaled = scaled.detach().clone().requires_grad_(True)
    biases = biases.detach().clone().requires_grad_(True)
    if width is None:
        total = clamped_full_sum(scaled, biases, temperature, 1)
    else:
        total = form(scaled, biases, temperature, width, 1)
    (total * weights).sum().backward()
    return total.detach(), scaled.grad, biases.grad


def saturates(biases, temperature, width) -> bool:
    """Whether every sigmoid outside a window of ``width`` thresholds is clamped: for one, the
    nearest, half the smallest gap times ``T`` beyond the clamp; for ``2 W``, every span of ``W``
    gaps."""
    if width == 1:
        return temperature * float((biases[..., 1:] - biases[..., :-1]).min()) / 2 > SATURATION
    half = width // 2
    return temperature * float((biases[..., half:] - biases[..., :-half]).min()) > SATURATION


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**16), channels=st.sampled_from([1, 3]),
       count=st.sampled_from([15, 31]), jitter=st.floats(0.0, 0.45),
       temperature=st.floats(1.0, 400.0), form=st.sampled_from([selected_sum, window_sum]),
       width=st.sampled_from([1, 2, 4]))
def test_a_saturated_window_is_the_clamped_full_sum(seed, channels, count, jitter, temperature,
                                                    form, width):
    """Both forms of the nearest-threshold sum (selects, compiled; a gather, eager) give the
    clamped full sum's value to within the left-out ``exp(-30)`` tails, and its gradients for
    the inputs and every threshold to float64 rounding, for any window whose left-out sigmoids
    are saturated: the nearest threshold alone, or ``2 W`` around the element."""
    biases = random_thresholds(seed, channels, count, jitter)
    assume(saturates(biases, temperature, width))
    if width <= 2:
        assert saturated_width(biases, temperature) <= width
    gen = torch.Generator().manual_seed(seed + 1)
    scaled = (torch.rand(4, channels, 40, generator=gen, dtype=torch.float64) * (count + 4)
              - count / 2 - 2)
    weights = torch.randn(scaled.shape, generator=gen, dtype=torch.float64)
    temperature = torch.tensor(temperature, dtype=torch.float64)
    value, grad_x, grad_b = value_and_gradients(form, scaled, biases, temperature, width,
                                                weights)
    full, full_x, full_b = value_and_gradients(form, scaled, biases, temperature, None, weights)
    assert float((value - full).abs().max()) <= count * 1e-13
    torch.testing.assert_close(grad_x, full_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_b, full_b, rtol=1e-12, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), channels=st.sampled_from([1, 3]),
       count=st.sampled_from([2, 3, 14, 15, 31]), jitter=st.floats(0.0, 0.45),
       temperature=st.floats(130.0, 400.0), offset=st.integers(-15, 0))
def test_nearest_staircase_has_the_scaled_clamped_sums_gradients(seed, channels, count, jitter,
                                                                 temperature, offset):
    """:func:`nearest_staircase` (the hand-written backward pass) against autograd through
    ``scale * (offset + clamped full sum)``: the value to the left-out ``exp(-30)`` tails, the
    gradients of the input, the per-channel scale and every threshold to float64 rounding; for
    the counts of 1-2 bits (masks by arithmetic) and 4-5 bits (masks by comparison)."""
    biases = random_thresholds(seed, channels, count, jitter)
    assume(saturates(biases, temperature, 1))
    gen = torch.Generator().manual_seed(seed + 1)
    scaled = (torch.rand(4, channels, 40, generator=gen, dtype=torch.float64) * (count + 4)
              - count / 2 - 2).requires_grad_(True)
    scale = (torch.rand(1, channels, 1, generator=gen, dtype=torch.float64) + 0.1)
    weights = torch.randn(scaled.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor(temperature, dtype=torch.float64)
    results = []
    for form in ("hand-written", "autograd"):
        inputs = [scaled.detach().clone().requires_grad_(True),
                  scale.detach().clone().requires_grad_(True),
                  biases.detach().clone().requires_grad_(True)]
        x, s, b = inputs
        if form == "autograd":
            y = s * (offset + clamped_full_sum(x, b, t, 1))
        else:
            y = nearest_staircase(x, b, t, s, offset, 1)
        (y * weights).sum().backward()
        results.append([y.detach()] + [i.grad for i in inputs])
    (y, grad_x, grad_s, grad_b), (want, want_x, want_s, want_b) = results
    assert float((y - want).abs().max()) <= count * 1e-12
    torch.testing.assert_close(grad_x, want_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_s, want_s, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_b, want_b, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("form", [selected_sum, window_sum])
def test_a_window_too_narrow_for_the_temperature_shows(form):
    """The same comparison fails where a sigmoid left out of the window is not saturated."""
    biases = random_thresholds(0, 1, 15, 0.0)
    assert saturated_width(biases, 20.0) is None
    assert saturated_width(biases, 31.0) == 2
    assert saturated_width(biases, 61.0) == 1
    scaled = torch.linspace(-9.0, 9.0, 721, dtype=torch.float64).reshape(1, 1, -1)
    weights = torch.ones_like(scaled)
    for temperature, width, apart in ((3.0, 2, True), (20.0, 2, True), (20.0, 4, False),
                                      (40.0, 1, True), (40.0, 2, False), (70.0, 1, False)):
        temperature = torch.tensor(temperature, dtype=torch.float64)
        value, grad_x, _ = value_and_gradients(form, scaled, biases, temperature, width, weights)
        full, full_x, _ = value_and_gradients(form, scaled, biases, temperature, None, weights)
        error = float((value - full).abs().max())
        assert (error > 1e-9) if apart else (error <= 15 * 1e-13)
        assert (float((grad_x - full_x).abs().max()) > 1e-8) == apart


def test_crowded_thresholds_wait_for_a_higher_temperature_or_get_no_window():
    biases = random_thresholds(0, 2, 15, 0.0)
    assert saturated_width(biases, 40.0) == 2
    assert saturated_width(biases, 70.0) == 1
    biases[1, 7] = biases[1, 6] + 0.1  # one channel's gap: saturated only from T = 300
    assert saturated_width(biases, 70.0) is None
    assert saturated_width(biases, 301.0) == 2
    assert saturated_width(biases, 601.0) == 1
    biases[1, 7] = biases[1, 6]
    assert saturated_width(biases, 1e6) is None
    three = random_thresholds(0, 1, 3, 0.0)
    assert saturated_width(three, 40.0) is None  # no window of 2 below 4 thresholds
    assert saturated_width(three, 70.0) == 1
    assert saturated_width(random_thresholds(0, 1, 1, 0.0), 1e4) is None


def output_and_gradients(q, module, x, weights) -> list:
    """``module(x)`` (``module`` is ``q`` or ``q`` compiled) and the gradients of ``(weights *
    module(x)).sum()`` for ``x`` and for each of ``q``'s parameters (None where none reaches)."""
    q.zero_grad()
    xg = x.clone().requires_grad_(True)
    y = module(xg)
    (y * weights).sum().backward()
    return [y.detach(), xg.grad] + [None if p.grad is None else p.grad.clone()
                                    for p in q.parameters()]


@pytest.mark.parametrize("bits, temperature, width", [(4, 45.0, 2), (4, 90.0, 1), (2, 90.0, 1)])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shuffled", [False, True])
def test_compiled_quantizer_sums_the_window_and_matches_the_full_sum(
        per_channel, bits, temperature, width, shuffled):
    """A compiled 4-bit QN quantizer, once annealed past saturation, traces :func:`selected_sum`
    over the window of 2, then the nearest threshold (a 2-bit one: the nearest threshold), and
    agrees with eager's full sum in value and in the gradients of its input and every parameter;
    its threshold gradients come out the same on every call (a fixed-order reduction, no atomic
    scatter). The forward's code evaluates ``width`` sigmoids per element (each a vectorized
    ``exp``), not one per threshold; with the nearest threshold alone the backward's code
    evaluates none (it reads the slope the forward kept); no kernel passes a ``bool`` tensor,
    and per tensor no sort runs in the graph (``sorted_biases``). ``shuffled``: the thresholds
    stored out of order (each row permuted), which the gradients must follow back to their
    places."""
    torch._dynamo.reset()  # the suite's other compiled quantizers count against the limit of 8
    torch.manual_seed(0)
    kind = "weight" if per_channel else "activation"
    q = make_quantizer("qn", kind, bits, signed=per_channel, per_channel=per_channel, channels=8)
    x = torch.randn(8, 16, 6, 6) * 3
    q.initialize(x)
    if shuffled:
        with torch.no_grad():
            q.biases.copy_(q.biases.gather(-1, torch.rand(q.biases.shape).argsort(dim=-1)))
        assert not torch.equal(q.biases, q.biases.sort(dim=-1).values)
    q.train()
    q.set_temperature(temperature)
    q.refresh_window()
    assert q.soft_window == width
    weights = torch.randn(x.shape)

    def run(module):
        return output_and_gradients(q, module, x, weights)

    compiled = torch.compile(q, dynamic=False, fullgraph=True)
    first, (forward_code, backward_code) = run_and_get_code(run, compiled)
    second = run(compiled)
    assert forward_code.count(".neg().exp()") == width
    assert "bool*" not in forward_code and "bool*" not in backward_code
    if width == 1 and not per_channel:
        assert "aten.sort" not in forward_code
    if width == 1:
        assert ".neg().exp()" not in backward_code  # it reads the forward's slope
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    q.window_width = lambda: None
    full = run(q)
    del q.window_width
    for got, want in zip(first, full, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_the_grid_is_read_only_for_fixed_thresholds_at_the_midpoints():
    """:attr:`soft_grid` is ``v_0`` for fixed 4-bit thresholds at the midpoints between levels,
    and None when they are learned, moved, or fewer than 14."""
    unsigned = make_quantizer("qn", "activation", 4, signed=False).set_temperature(90.0)
    signed = make_quantizer("qn", "weight", 4, signed=True, per_channel=True, channels=3)
    signed.set_temperature(90.0)
    for q, lowest in ((unsigned, 0), (signed, -7)):
        q.refresh_window()
        assert q.soft_window == 1 and q.soft_grid is None
        q.learn_thresholds(False)
        q.refresh_window()
        assert q.soft_grid == lowest
        with torch.no_grad():
            q.biases[-1, 3] += 1e-3
        q.refresh_window()
        assert q.soft_window == 1 and q.soft_grid is None
    two_bits = make_quantizer("qn", "activation", 2, signed=False).set_temperature(90.0)
    two_bits.learn_thresholds(False).refresh_window()
    assert two_bits.soft_window == 1 and two_bits.soft_grid is None


@pytest.mark.parametrize("per_channel", [False, True])
def test_fixed_thresholds_on_the_grid_compile_to_the_same_numbers_without_comparisons(
        per_channel):
    """Compiled, fixed 4-bit thresholds at the midpoints read each element's nearest threshold
    off the grid (:attr:`soft_grid`): the forward's code compares with no midpoint, and its
    values and the gradients of the input and both scales equal those of the compared form
    (one comparison per midpoint) bit for bit, on inputs at, just below and just above every
    level and threshold, beyond both ends, and random."""
    torch._dynamo.reset()  # the suite's other compiled quantizers count against the limit of 8
    kind = "weight" if per_channel else "activation"
    q = make_quantizer("qn", kind, 4, signed=per_channel, per_channel=per_channel, channels=8)
    grid = torch.arange(-40, 72) / 4  # quarter steps: every level and threshold, -10 to 17.75
    around = torch.cat([grid, torch.nextafter(grid, grid - 1), torch.nextafter(grid, grid + 1)])
    x = torch.cat([around, torch.randn(8 * 16 * 36 - len(around)) * 6]).reshape(8, 16, 6, 6)
    q.initialize(x)
    with torch.no_grad():
        q.log_beta.zero_()  # beta = 1: the inputs above are the scaled inputs exactly
    q.learn_thresholds(False).set_temperature(90.0).train()
    q.refresh_window()
    assert q.soft_window == 1 and q.soft_grid == q.lowest
    weights = torch.randn(x.shape)
    names = [name for name, _ in q.named_parameters()]

    def run(module):
        results = output_and_gradients(q, module, x, weights)
        assert results[2 + names.index("biases")] is None
        del results[2 + names.index("biases")]
        return results

    compiled = torch.compile(q, dynamic=False, fullgraph=True)
    on_grid, (grid_forward, _) = run_and_get_code(run, compiled)
    q.soft_grid = None
    compared, (compared_forward, _) = run_and_get_code(run, compiled)
    def comparisons(code):
        return len(re.findall(r"tmp\d+ >= tmp\d+", code))

    assert comparisons(grid_forward) == 0 and comparisons(compared_forward) >= 14
    assert all(torch.equal(a, b) for a, b in zip(on_grid, compared, strict=True))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("compiled", [False, True])
def test_threshold_index_counts_in_the_integer_type_asked_for(dtype, compiled):
    x = torch.linspace(-3, 3, 97)
    thresholds = torch.tensor([-1.5, -0.5, 0.5, 1.5])

    def count(x):
        return threshold_index(x, thresholds, None, dtype)

    if compiled:
        torch._dynamo.reset()
        count = torch.compile(count, dynamic=False, fullgraph=True)
    index = count(x)
    assert index.dtype == dtype
    assert torch.equal(index.long(), (x[:, None] >= thresholds).sum(dim=1))
