"""The pieces of :mod:`qcompile.quant.base` that every method builds on."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.quant.base import ClampThrough, clamp_through, step_mask

finite = st.floats(-8, 8, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(finite, st.sampled_from([0.0, -0.0, 1.0, 3.0, -2.0])),
                       min_size=1, max_size=40),
       low=st.sampled_from([-2.0, 0.0, 1.0]), width=st.sampled_from([0.0, 1.0, 2.0]))
def test_clamp_through_is_torch_clamp_value_and_gradient(values, low, width):
    """:class:`ClampThrough` (the compiled form of ``clamp_through``) has the value and gradient
    of ``torch.clamp``, bit for bit, on inputs that include the bounds, zeros and -0.0 (torch
    passes the gradient strictly inside the bounds)."""
    high = low + width
    x = torch.tensor(values)
    upstream = torch.linspace(-1, 1, len(values))
    results = []
    for clamp in (ClampThrough.apply, torch.clamp):
        xs = x.clone().requires_grad_()
        y = clamp(xs, low, high)
        (y * upstream).sum().backward()
        results.append((y.detach(), xs.grad))
    for mine, reference in zip(*results):
        assert torch.equal(mine, reference)


@pytest.mark.parametrize("at_zero", [0.0, 1.0])
def test_step_mask_is_the_comparison_as_floats(at_zero):
    x = torch.tensor([-3.0, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf"), float("-inf")])
    expected = torch.where(x > 0, 1.0, torch.where(x < 0, 0.0, at_zero))
    mask = step_mask(x, at_zero)
    assert mask.dtype == x.dtype
    assert torch.equal(mask, expected)


def test_compiled_clamp_through_is_torch_clamp():
    torch._dynamo.reset()
    x = torch.tensor([-3.0, -2.0, -0.0, 0.0, 0.5, 1.0, 1.5, 2.0])
    upstream = torch.linspace(-1, 1, len(x))
    compiled = torch.compile(clamp_through, fullgraph=True)
    results = []
    for clamp in (compiled, torch.clamp):
        xs = x.clone().requires_grad_()
        y = clamp(xs, 0.0, 1.5)
        (y * upstream).sum().backward()
        results.append((y.detach(), xs.grad))
    for mine, reference in zip(*results):
        assert torch.equal(mine, reference)
