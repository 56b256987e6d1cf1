"""Quantization Networks' sigmoid sum with one shared exponential: the term-by-term sum, finite."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.quant import make_quantizer
from qcompile.quant.sigmoid_sum import MAX_SPAN, SharedExponentialSum, shares_exponential

STEP_TOLERANCE = 1e-5
"""Largest difference from the term-by-term float64 sum, per step of the staircase."""


def reference(scaled, biases, temperature, heights):
    """The paper's sum term by term in float64, and its gradients for ``grad``."""
    scaled = scaled.double().detach().requires_grad_(True)
    biases = biases.double().detach().requires_grad_(True)
    steps = torch.sigmoid(temperature * (scaled.unsqueeze(-1) - biases))
    return (steps * heights.double()).sum(-1), scaled, biases


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**16), channels=st.sampled_from([1, 3]),
       count=st.sampled_from([1, 2, 3, 7, 15]), spacing=st.floats(0.05, 4.0),
       jitter=st.floats(0.0, 0.45), fill=st.floats(0.01, 0.99))
def test_the_shared_exponential_sum_is_the_term_by_term_sum(seed, channels, count, spacing,
                                                           jitter, fill):
    gen = torch.Generator().manual_seed(seed)
    even = (torch.arange(count) - count / 2 + 0.5) * spacing
    biases = (even + jitter * spacing * torch.randn(channels, count, generator=gen))
    biases = biases[:, torch.randperm(count, generator=gen)].reshape(1, channels, 1, count)
    span = float((biases.amax(-1) - biases.amin(-1)).max())
    temperature = torch.tensor(fill * MAX_SPAN / max(span, spacing))
    assert shares_exponential(biases, float(temperature))
    wide = (count + 2) * spacing
    scaled = wide * (torch.rand(4, channels, 6, generator=gen) - 0.5) * 2
    scaled[0, :, :3] = torch.tensor([-1e4, 1e4, 3e38])
    scaled = scaled.requires_grad_(True)
    leaf = biases.clone().requires_grad_(True)
    heights = torch.full((count,), 1.0 if seed % 2 else 2.0)
    total = SharedExponentialSum.apply(scaled, leaf, temperature, heights)
    grad = torch.randn(total.shape, generator=gen)
    total.backward(grad)
    expected, scaled64, biases64 = reference(scaled, biases, temperature.double(), heights)
    expected.backward(grad.double())

    assert torch.isfinite(total).all() and torch.isfinite(scaled.grad).all()
    step = float(heights[0])
    assert (total.double() - expected).abs().max() <= STEP_TOLERANCE * step * count
    # a slope is T * sigmoid' <= T / 4 per step: the same relative tolerance on the gradients
    slope = float(temperature) * step * count / 4
    assert (scaled.grad.double() - scaled64.grad).abs().max() <= (
        STEP_TOLERANCE * slope * grad.abs().max())
    summed = grad.abs().sum()
    assert (leaf.grad.double() - biases64.grad).abs().max() <= STEP_TOLERANCE * slope * summed


def test_the_span_decides_and_past_it_the_factors_would_overflow():
    biases = torch.tensor([[-7.0, 0.0, 7.0]])
    assert shares_exponential(biases, MAX_SPAN / 14)
    assert not shares_exponential(biases, MAX_SPAN / 14 * 1.01)
    # past float32's range the shared factors are 0 and infinity: the reason for the limit
    temperature = torch.tensor(100.0)
    at_top = torch.full((1, 1), 7.0)
    total = SharedExponentialSum.apply(at_top, biases, temperature, torch.ones(3))
    assert not torch.isclose(total, torch.tensor(2.5)).all()
    within = SharedExponentialSum.apply(at_top, biases, torch.tensor(MAX_SPAN / 14),
                                        torch.ones(3))
    assert torch.isclose(within, torch.tensor(2.5), atol=1e-5).all()


@pytest.mark.parametrize("bits, channels", [(2, 1), (4, 1), (4, 3)])
def test_a_quantizer_shares_it_while_the_temperature_allows_and_agrees_with_the_full_sum(
        bits, channels):
    per_channel = channels > 1
    kind = "weight" if per_channel else "activation"
    q = make_quantizer("qn", kind, bits, signed=per_channel, per_channel=per_channel,
                       channels=channels)
    x = torch.randn(channels, 200, generator=torch.Generator().manual_seed(bits)) * 3
    x = x if per_channel else x.abs()
    q.initialize(x)
    q.train()
    span = float((q.biases.amax(-1) - q.biases.amin(-1)).max().detach())
    for temperature, shared in ((1.0, True), (MAX_SPAN / span * 1.5, False)):
        q.set_temperature(temperature)
        assert q.shares_exponential() is shared and q.soft_shared is False
        q.refresh_window()
        assert q.soft_shared is shared
        alpha, beta = q.scales()
        shape = q.param_shape(x)
        full, _, _ = reference(beta.reshape(shape) * x, q.biases.reshape(*shape, -1),
                               q.temperature.double(), q.step_heights())
        expected = alpha.double().reshape(shape) * (full + q.values[0])
        scale = float(alpha.detach().max())
        assert (q(x).double() - expected).abs().max() <= STEP_TOLERANCE * scale * len(q.values)
        compiled = torch.compile(q, dynamic=False, fullgraph=True)
        assert (compiled(x).double() - expected).abs().max() <= (
            STEP_TOLERANCE * scale * len(q.values))
        torch.compiler.reset()


def test_quantizer_gradients_match_the_term_by_term_sum():
    q = make_quantizer("qn", "activation", 4, signed=False)
    x = torch.rand(500, generator=torch.Generator().manual_seed(0)) * 12
    q.initialize(x)
    q.train()
    grads = []
    for shared in (True, False):
        q.zero_grad()
        q.shares_exponential = lambda shared=shared: shared
        q(x).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in (q.log_alpha, q.log_beta, q.biases)])
    del q.shares_exponential
    for with_shared, term_by_term in zip(*grads, strict=True):
        torch.testing.assert_close(with_shared, term_by_term, rtol=1e-4, atol=1e-4)
