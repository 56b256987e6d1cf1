"""QIL (Jung et al. 2019): interval zones, the transformer's gamma, exact thresholds, init, QAT."""

import pytest
import torch

from qcompile.quant import get_method, make_quantizer
from qcompile.quant.qil import QILActivationQuantizer, QILWeightQuantizer


def set_interval(q, center, distance, gamma=1.0):
    with torch.no_grad():
        q.center.fill_(center)
        q.distance.fill_(distance)
        q.gamma.fill_(gamma)
    return q


def paper_weight(w, c, d, gamma, q_d):
    """The paper's transformer and discretizer (float64), times the output scale ``c + d``."""
    w = w.double()
    base = (0.5 / d) * w.abs() + (0.5 - 0.5 * c / d)
    w_hat = base.clamp(0, 1) ** gamma
    return torch.sign(w) * torch.round(w_hat * q_d) / q_d * (c + d)


def test_registered_with_both_roles():
    method = get_method("qil")
    assert method.weight is QILWeightQuantizer and method.activation is QILActivationQuantizer


@pytest.mark.parametrize("bits,gamma", [(2, 1.0), (3, 0.6), (4, 1.7), (8, 1.3)])
def test_forward_is_the_papers_transformer_and_discretizer(bits, gamma):
    c, d = 0.5, 0.3
    q = set_interval(make_quantizer("qil", "weight", bits, signed=True), c, d, gamma)
    w = torch.linspace(-1.2, 1.2, 4801)
    expected = paper_weight(w, c, d, gamma, q.q_d)
    spec = q.integer_spec()
    near_tie = torch.isclose(w.abs().unsqueeze(-1), spec.thresholds.abs(), atol=1e-5).any(-1)
    got = q(w).double()
    torch.testing.assert_close(got[~near_tie], expected[~near_tie], rtol=1e-6, atol=1e-7)


def test_pruned_zone_is_zero_and_clipped_zone_is_the_top_level():
    c, d = 0.5, 0.3
    q = set_interval(make_quantizer("qil", "weight", 3, signed=True), c, d, gamma=1.0)
    w = torch.linspace(-2, 2, 2001)
    out = q(w)
    pruned = w.abs() < c - d
    clipped = w.abs() > c + d
    assert bool((out[pruned] == 0).all())
    torch.testing.assert_close(out[clipped].abs(), torch.full_like(out[clipped], c + d))
    torch.testing.assert_close(out[clipped].sign(), w[clipped].sign())
    inside = ~pruned & ~clipped
    assert len(torch.unique(out[inside])) == 2 * q.q_d + 1


def test_gamma_bends_the_transformer():
    """gamma > 1 sends more weights to low levels (more zeros), gamma < 1 fewer."""
    w = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 0.3
    zeros = {}
    for gamma in (0.5, 1.0, 2.0):
        q = set_interval(make_quantizer("qil", "weight", 3, signed=True), 0.45, 0.4, gamma)
        zeros[gamma] = int((q(w) == 0).sum())
    assert zeros[0.5] < zeros[1.0] < zeros[2.0]


def test_integer_spec_is_exact_at_every_threshold_and_mirrors_the_sign():
    q = set_interval(make_quantizer("qil", "weight", 4, signed=True, per_channel=True,
                                    channels=3), 0.4, 0.25, 1.4)
    with torch.no_grad():
        q.center.copy_(torch.tensor([0.4, 0.6, 0.3]))
    spec = q.integer_spec()
    t = spec.thresholds
    x = torch.cat([t, torch.nextafter(t, t + 1), torch.nextafter(t, t - 1)], dim=1)
    x = torch.cat([x, -x], dim=1)
    q.eval()
    out = q(x)
    assert torch.equal(out, spec.dequantize(spec.quantize(x)))
    assert torch.equal(q(-x), -out)


@pytest.mark.parametrize("role,signed", [("weight", True), ("activation", False)])
def test_training_forward_is_the_lookup_up_to_rounding(role, signed):
    """In training the transformer and discretizer give the forward; away from the thresholds
    they pick the lookup's codes and so its values, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    q = make_quantizer("qil", role, 3, signed=signed, per_channel=signed, channels=4)
    x = torch.randn(4, 500, generator=gen) * 0.5
    q.initialize(x if signed else x.abs())
    with torch.no_grad():
        q.center.mul_(torch.exp(0.3 * torch.randn(q.center.shape, generator=gen)))
        if q.learn_gamma:
            q.gamma.copy_(torch.tensor([0.6, 1.0, 1.5, 2.5]))
    spec = q.integer_spec()
    expected = spec.dequantize(spec.quantize(x))
    trained = q.train()(x)
    assert torch.equal(trained, expected)
    assert int((trained != 0).sum()) > 500 and int((expected == 0).sum()) > 0


@pytest.mark.parametrize("bits", [2, 4])
def test_gradients_follow_the_transformer(bits):
    """The gradients are those of ``(c + d) sign(w) w_hat`` at every bit-width (at 2 bits
    ``q_D = 1``, so a surrogate off by a factor of ``q_D`` shows only at 4)."""
    c, d, gamma = 0.5, 0.3, 1.5
    q = set_interval(make_quantizer("qil", "weight", bits, signed=True), c, d, gamma)
    w = torch.tensor([0.1, 0.35, 0.6, 1.0, -0.6], requires_grad=True)
    q(w).sum().backward()
    assert w.grad[0] == 0 and w.grad[3] == 0
    assert bool((w.grad[[1, 2, 4]] > 0).all())
    base = (0.5 / d) * torch.tensor([0.35, 0.6, 0.6]) + (0.5 - 0.5 * c / d)
    signs = torch.tensor([1.0, 1.0, -1.0])
    expected_gamma = ((c + d) * signs * base**gamma * torch.log(base)).sum()
    torch.testing.assert_close(q.gamma.grad[0], expected_gamma)
    assert q.center.grad is not None and q.distance.grad is not None


def test_activation_transformer_is_linear_and_one_sided():
    q = make_quantizer("qil", "activation", 2, signed=False)
    assert not any(name == "gamma" for name, _ in q.named_parameters())
    set_interval(q, 1.0, 0.5)
    x = torch.tensor([-3.0, 0.4, 0.6, 0.9, 1.1, 1.4, 1.6, 9.0])
    step = 1.5 / 3
    expected = torch.tensor([0, 0, 0, 1, 2, 3, 3, 3]) * step
    torch.testing.assert_close(q(x), expected)


@pytest.mark.parametrize("bits", [2, 3])
def test_initialize_beats_the_naive_max_interval(bits):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(bits)) * 0.05
    q = make_quantizer("qil", "weight", bits, signed=True, per_channel=True, channels=8)
    q.initialize(w)
    torch.testing.assert_close(q.center, q.distance)
    assert bool((q.gamma == 1).all())
    fitted = (q(w) - w).pow(2).mean()
    peak = w.abs().amax(dim=1)
    with torch.no_grad():
        q.center.copy_(peak / 2)
        q.distance.copy_(peak / 2)
    naive = (q(w) - w).pow(2).mean()
    assert fitted < 0.9 * naive


def test_binary_weights_take_two_levels():
    q = make_quantizer("qil", "weight", 1, signed=True)
    w = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    q.initialize(w)
    out = q(w)
    assert set(out.unique().tolist()) == {-w.abs().mean().item(), w.abs().mean().item()}


@pytest.mark.parametrize("bits", [2, 4])
def test_tiny_layer_trains(train_tiny, bits):
    losses = train_tiny("qil", bits)
    assert losses[-1] < 0.5 * losses[0]
