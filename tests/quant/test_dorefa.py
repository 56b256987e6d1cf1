"""DoReFa-Net (Zhou et al. 2016): tanh-normalized weight levels (times a least-squares scale),
1-bit weights, activations."""

import pytest
import torch

from qcompile.errors import ConfigError
from qcompile.quant import make_quantizer


def paper_weights(w, bits):
    """``2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1`` in float64, and the pre-round."""
    n = 2**bits - 1
    t = torch.tanh(w.double())
    unit = t / (2 * t.abs().max()) + 0.5
    return 2 * torch.round(unit * n) / n - 1, unit * n


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weights_follow_the_paper_times_the_fitted_scale(bits):
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(bits)) * 0.7
    q = make_quantizer("dorefa", "weight", bits, signed=True)
    y = q(w).detach() / q.magnitude
    expected, before_round = paper_weights(w, bits)
    near_tie = ((before_round - before_round.floor()) - 0.5).abs() < 1e-4
    assert bool((y.abs() <= 1 + 1e-6).all())
    assert max(float(y.max()), -float(y.min())) == pytest.approx(1.0)
    torch.testing.assert_close(y.double()[~near_tie], expected[~near_tie], rtol=0, atol=1e-6)
    assert y.unique().numel() <= 2**bits


def test_weight_gradient_is_the_paper_straight_through_estimate():
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    upstream = torch.randn(5, 7, generator=torch.Generator().manual_seed(4))
    w1, w2 = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    q = make_quantizer("dorefa", "weight", 3, signed=True)
    (q(w1) * upstream).sum().backward()
    t = torch.tanh(w2)
    (2 * (t / (2 * t.abs().max()) + 0.5) - 1).mul(upstream * q.magnitude).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)


def test_per_channel_weights_normalize_each_channel():
    w = torch.randn(4, 10) * torch.tensor([[0.01], [0.1], [1.0], [10.0]])
    q = make_quantizer("dorefa", "weight", 2, signed=True, per_channel=True, channels=4)
    y = q(w).detach()
    torch.testing.assert_close(y.abs().amax(dim=1), q.magnitude)
    unit = y / q.magnitude[:, None]
    fit = (w * unit).sum(dim=1) / (unit * unit).sum(dim=1)
    torch.testing.assert_close(q.magnitude, fit)
    assert q.integer_spec().thresholds.shape == (4, 3)


def test_normalizer_tracks_the_weight_in_training_and_freezes_in_eval():
    w = torch.randn(6, 6)
    q = make_quantizer("dorefa", "weight", 4, signed=True)
    q(w)
    torch.testing.assert_close(q.normalizer, torch.tanh(w).abs().max().reshape(1))
    q.eval()
    y = q(3 * w)
    torch.testing.assert_close(q.normalizer, torch.tanh(w).abs().max().reshape(1))
    torch.testing.assert_close(y.abs().max(), q.magnitude[0])


def test_zero_sits_on_the_middle_threshold():
    q = make_quantizer("dorefa", "weight", 3, signed=True)
    w = torch.randn(20)
    q.initialize(w)
    spec = q.integer_spec()
    assert float(spec.thresholds[3]) == 0.0
    assert spec.quantize(torch.tensor([0.0, -1e-30])).tolist() == [0, -1]
    top = float(q.magnitude)
    assert spec.dequantize(torch.tensor([0, -1])).tolist() == pytest.approx([top / 7, -top / 7])
    assert spec.values is None  # uniform levels: the affine map states them


def test_one_bit_weights_are_sign_times_mean_magnitude():
    w = torch.tensor([[-2.0, 0.0, 1.0, 3.0], [0.5, -0.5, 0.25, -0.25]], requires_grad=True)
    q = make_quantizer("dorefa", "weight", 1, signed=True, per_channel=True, channels=2)
    y = q(w)
    expected = torch.tensor([[-1.5, 1.5, 1.5, 1.5], [0.375, -0.375, 0.375, -0.375]])
    assert torch.equal(y.detach(), expected)
    upstream = torch.randn(2, 4)
    (y * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_unsigned_weights_and_signed_activations_are_refused():
    with pytest.raises(ConfigError, match="signed=True"):
        make_quantizer("dorefa", "weight", 4, signed=False)
    with pytest.raises(ConfigError, match="signed=False"):
        make_quantizer("dorefa", "activation", 4, signed=True)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_activations_are_quantize_k_of_clipped_input(bits):
    n = 2**bits - 1
    x = torch.linspace(-1, 2, 3001, requires_grad=True)
    y = make_quantizer("dorefa", "activation", bits, signed=False)(x)
    expected = torch.round(x.detach().double().clamp(0, 1) * n) / n
    torch.testing.assert_close(y.detach().double(), expected, rtol=0, atol=1e-6)
    y.sum().backward()
    inside = (x.detach() >= 0) & (x.detach() <= 1)
    assert torch.equal(x.grad, inside.float())


@pytest.mark.parametrize("bits", [2, 4])
def test_training_a_tiny_model_lowers_the_loss(train_tiny, bits):
    losses = train_tiny("dorefa", bits)
    assert losses[-1] < 0.7 * losses[0]
