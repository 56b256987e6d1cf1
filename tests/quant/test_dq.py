"""Direct quantization (Hoang et al. 2020): learnable levels, channel-aware activation steps."""

import pytest
import torch

from qcompile.quant import get_method, make_quantizer
from qcompile.quant.dq import (
    LEVEL_GRID,
    DQActivationQuantizer,
    DQWeightQuantizer,
    separating_thresholds,
    snap_levels,
)
from qcompile.quant.fit import candidate_steps, rounding_errors


def set_levels(q, levels):
    with torch.no_grad():
        q.levels.copy_(torch.as_tensor(levels, dtype=q.levels.dtype).expand_as(q.levels))
    return q


def outlier_activations(seed=0):
    """(N, 16, 8, 8) post-ReLU activations: 15 channels on [0, 1], one reaching 40."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(32, 16, 8, 8, generator=gen)
    x[:, 3] *= 40
    return x


def relative_errors(x, out):
    rows = x.movedim(1, 0).reshape(x.shape[1], -1)
    error = (out.movedim(1, 0).reshape(x.shape[1], -1) - rows).pow(2).sum(1)
    return error / rows.pow(2).sum(1)


def test_registered_with_both_roles():
    method = get_method("dq")
    assert method.weight is DQWeightQuantizer and method.activation is DQActivationQuantizer


def test_weights_select_the_nearest_level():
    q = set_levels(make_quantizer("dq", "weight", 2, signed=True), [-0.9, -0.1, 0.2, 1.1])
    w = torch.linspace(-2, 2, 4001)
    levels = snap_levels(torch.tensor([[-0.9, -0.1, 0.2, 1.1]]))[0][0]
    nearest = levels[(w.unsqueeze(-1) - levels).abs().argmin(-1)]
    midpoints = (levels[1:] + levels[:-1]) / 2
    off_tie = ~torch.isclose(w.unsqueeze(-1), midpoints, atol=1e-6).any(-1)
    assert torch.equal(q(w)[off_tie], nearest[off_tie])
    assert q.integer_spec().codes.tolist() == [-2, -1, 0, 1]


@pytest.mark.parametrize("per_channel", [False, True])
def test_levels_are_integers_on_a_grid_of_each_channel(per_channel):
    """Deployment multiplies integers: every level is an integer of at most 8 bits times the
    channel's grid step, the largest level reaches the end of the grid, and the values the
    forward selects are exactly those products."""
    q = make_quantizer("dq", "weight", 3, signed=True, per_channel=per_channel, channels=4)
    w = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    q.initialize(w)
    spec = q.integer_spec()
    grid = spec.scale.reshape(-1, 1) if per_channel else spec.scale[:1]
    assert spec.levels.dtype == torch.int64 and int(spec.levels.abs().max()) == LEVEL_GRID
    assert torch.equal(spec.values, spec.levels.to(grid.dtype) * grid)
    assert torch.equal(q(w), spec.dequantize(spec.quantize(w)))
    assert set(q(w).unique().tolist()) <= set(spec.values.flatten().tolist())


def test_level_gradient_is_the_sum_over_the_weights_of_each_level():
    q = set_levels(make_quantizer("dq", "weight", 2, signed=True, per_channel=True, channels=3),
                   [-1.0, -0.3, 0.3, 1.0])
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, generator=gen)
    upstream = torch.randn(3, 40, generator=gen)
    (q(w) * upstream).sum().backward()
    codes = q.integer_spec().quantize(w) - q.integer_spec().codes[0]
    expected = torch.zeros(3, 4).scatter_add_(1, codes, upstream)
    torch.testing.assert_close(q.levels.grad, expected)


def test_gradient_steps_move_the_quantized_weights_directly():
    """With the float weights frozen, descending on the levels alone lowers the loss."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(256, generator=gen)
    target = 0.5 * w + 0.1
    q = make_quantizer("dq", "weight", 2, signed=True)
    q.initialize(w)
    before = q.levels.detach().clone()
    optimizer = torch.optim.SGD(q.parameters(), lr=1.0)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = (q(w) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.allclose(q.levels.detach(), before)


def test_initialize_finds_the_levels_of_clustered_weights():
    gen = torch.Generator().manual_seed(2)
    centers = torch.tensor([-0.7, -0.2, 0.1, 0.9])
    noise = 0.01 * torch.randn(4000, generator=gen)
    w = centers[torch.randint(0, 4, (4000,), generator=gen)] + noise
    q = make_quantizer("dq", "weight", 2, signed=True)
    q.initialize(w)
    torch.testing.assert_close(q.sorted_levels()[0], centers, atol=2e-3, rtol=0)


def test_initialize_per_channel_beats_a_uniform_grid():
    w = torch.randn(6, 100, generator=torch.Generator().manual_seed(3)) ** 3
    q = make_quantizer("dq", "weight", 3, signed=True, per_channel=True, channels=6)
    q.initialize(w)
    fitted = (q(w) - w).pow(2).mean()
    peak = w.abs().amax(1, keepdim=True)
    with torch.no_grad():
        q.levels.copy_(torch.linspace(-1, 1, 8) * peak)
    assert fitted < 0.5 * (q(w) - w).pow(2).mean()


def test_levels_quantize_to_themselves_even_when_adjacent_in_float():
    one = torch.tensor(1.0)
    next_up = torch.nextafter(one, torch.tensor(2.0))
    levels = torch.stack([torch.tensor(-1.0), torch.tensor(0.0), one, next_up])
    thresholds = separating_thresholds(levels)
    assert bool((thresholds[1:] >= thresholds[:-1]).all())
    q = set_levels(make_quantizer("dq", "weight", 2, signed=True), levels)
    snapped = q.integer_spec().values
    assert torch.equal(q(snapped), snapped)


def test_channel_aware_step_serves_the_majority_of_channels():
    """A per-tensor step fit to the total squared error bends to the outlier channel."""
    x = outlier_activations()
    q = make_quantizer("dq", "activation", 2, signed=False)
    q.initialize(x)
    aware = relative_errors(x, q(x))
    rows = x.movedim(1, 0).reshape(16, -1)
    steps = candidate_steps(rows.abs().amax().reshape(1), 3, points=200)
    total = rounding_errors(rows, steps, 0, 3).mean(dim=1)
    with torch.no_grad():
        q.step.fill_(float(steps[total.argmin(), 0]))
    plain = relative_errors(x, q(x))
    majority = torch.arange(16) != 3
    assert aware[majority].median() < 0.5 * plain[majority].median()
    assert aware.mean() < plain.mean()


def test_channel_aware_error_is_a_differentiable_objective():
    x = outlier_activations(seed=1)
    q = make_quantizer("dq", "activation", 3, signed=False)
    with torch.no_grad():
        q.step.fill_(2.0)
    optimizer = torch.optim.Adam(q.parameters(), lr=0.05)
    errors = []
    for _ in range(40):
        optimizer.zero_grad()
        error = q.channel_aware_error(x)
        error.backward()
        optimizer.step()
        errors.append(error.item())
    assert errors[-1] < 0.5 * errors[0]


@pytest.mark.parametrize("signed", [False, True])
def test_activation_step_pushed_below_zero_recovers(signed):
    """An optimizer step can overshoot a small step size below zero (Adam moves it by about its
    learning rate); the floor keeps the forward finite and must still pass the gradient that
    brings the step back, or every later value lands on one level for good."""
    q = make_quantizer("dq", "activation", 8, signed=signed)
    with torch.no_grad():
        q.step.fill_(-4e-3)
    x = torch.linspace(0.0 if not signed else -0.5, 0.5, 101)
    ((q(x) - x) ** 2).sum().backward()
    assert torch.isfinite(q(x)).all()
    assert float(q.step.grad) < 0, "the gradient must push the step back up"


def test_per_channel_activation_steps_fit_each_channel():
    x = outlier_activations(seed=2)
    q = make_quantizer("dq", "activation", 4, signed=False, per_channel=True, channels=16,
                       channel_axis=1)
    q.initialize(x)
    assert q.step[3] > 20 * q.step[torch.arange(16) != 3].max()
    spec = q.integer_spec()
    assert torch.equal(q(x), spec.dequantize(spec.quantize(x)))


@pytest.mark.parametrize("bits", [2, 4])
def test_tiny_layer_trains(train_tiny, bits):
    losses = train_tiny("dq", bits)
    assert losses[-1] < 0.5 * losses[0]
