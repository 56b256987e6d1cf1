"""LSQ (Esser et al. 2020): the paper's quantizer, step-size gradient, gradient scale and init."""

import math

import pytest
import torch

from qcompile.quant import get_method, make_quantizer
from qcompile.quant.lsq import LSQActivationQuantizer, LSQWeightQuantizer, scale_gradient


def paper_step_gradient(v, s, q_n, q_p, upstream):
    """Eq. 3: d v_hat / d s, summed against the upstream gradient, in float64."""
    v, s, upstream = v.double(), s.double(), upstream.double()
    ratio = v / s
    inside = -ratio + torch.round(ratio)
    local = torch.where(ratio <= -q_n, -float(q_n), torch.where(ratio >= q_p, float(q_p), inside))
    return (local * upstream).sum()


def test_registered_with_both_roles():
    method = get_method("lsq")
    assert method.weight is LSQWeightQuantizer and method.activation is LSQActivationQuantizer
    assert LSQWeightQuantizer.method == "lsq"


@pytest.mark.parametrize("bits,signed,q_n,q_p", [(2, True, 2, 1), (4, True, 8, 7),
                                                  (3, False, 0, 7), (8, False, 0, 255)])
def test_levels_follow_the_paper(bits, signed, q_n, q_p):
    q = make_quantizer("lsq", "weight", bits, signed=signed)
    spec = q.integer_spec()
    assert (spec.qmin, spec.qmax) == (-q_n, q_p)
    with torch.no_grad():
        q.step.fill_(0.25)
    x = torch.linspace(-100, 100, 2001)
    expected = torch.round(torch.clamp(x / 0.25, -q_n, q_p)) * 0.25
    assert torch.equal(q(x), expected)


@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (3, False), (4, False)])
def test_step_initialized_from_mean_magnitude(bits, signed):
    w = torch.randn(6, 5, 3, 3) * 0.1
    q = make_quantizer("lsq", "weight", bits, signed=signed, per_channel=True, channels=6)
    q.initialize(w)
    q_p = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    expected = 2 * w.abs().reshape(6, -1).mean(dim=1) / math.sqrt(q_p)
    torch.testing.assert_close(q.step.detach(), expected)


@pytest.mark.parametrize("bits,signed", [(5, True), (8, True), (8, False)])
def test_from_five_bits_the_step_starts_at_least_squares(bits, signed):
    w = torch.randn(6, 5, 3, 3) * 0.1
    q, fitted = (make_quantizer("lsq", "weight", bits, signed=signed, per_channel=True,
                                channels=6) for _ in range(2))
    q.initialize(w)
    fitted.initialize_least_squares(w)
    assert torch.equal(q.step, fitted.step)
    paper_rule = 2 * w.abs().reshape(6, -1).mean(dim=1) / math.sqrt(q.q_p)
    assert bool((q.step < paper_rule).all())


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_weight_step_gradient_is_eq3_times_grad_scale(bits, per_channel):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(4, 6, 3, 3, generator=gen)
    upstream = torch.randn(w.shape, generator=gen)
    q = make_quantizer("lsq", "weight", bits, signed=True, per_channel=per_channel, channels=4)
    q.initialize(w)
    (q(w) * upstream).sum().backward()
    q_n, q_p = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    if per_channel:
        g = 1 / math.sqrt(w[0].numel() * q_p)
        expected = torch.stack([
            g * paper_step_gradient(w[c], q.step.detach()[c], q_n, q_p, upstream[c])
            for c in range(4)
        ])
    else:
        g = 1 / math.sqrt(w.numel() * q_p)
        expected = g * paper_step_gradient(w, q.step.detach(), q_n, q_p, upstream).reshape(1)
    torch.testing.assert_close(q.step.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_activation_grad_scale_counts_features_per_example():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 4, 4, generator=gen) * 2
    upstream = torch.randn(x.shape, generator=gen)
    q = make_quantizer("lsq", "activation", 3, signed=False)
    q.initialize(x)
    (q(x) * upstream).sum().backward()
    g = 1 / math.sqrt(3 * 4 * 4 * 7)
    expected = g * paper_step_gradient(x, q.step.detach(), 0, 7, upstream)
    torch.testing.assert_close(q.step.grad.double(), expected.reshape(1), rtol=1e-5, atol=1e-7)


def test_input_gradient_is_straight_through_inside_the_range():
    q = make_quantizer("lsq", "activation", 2, signed=False)
    with torch.no_grad():
        q.step.fill_(1.0)
    x = torch.tensor([-1.0, 0.2, 1.4, 2.9, 3.5, 9.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_scale_gradient_keeps_the_value_bit_exact():
    x = torch.tensor([0.1, 1 / 3, 7.3e-5, 123.456], requires_grad=True)
    y = scale_gradient(x, 1 / math.sqrt(12345 * 7))
    assert torch.equal(y.detach(), x.detach())
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / math.sqrt(12345 * 7)))


def test_binary_signed_weights():
    w = torch.randn(3, 10)
    q = make_quantizer("lsq", "weight", 1, signed=True, per_channel=True, channels=3)
    q.initialize(w)
    torch.testing.assert_close(q.step.detach(), w.abs().mean(dim=1))
    y = q(w)
    s = q.step.detach().reshape(3, 1)
    assert torch.equal(y, torch.where(w >= 0, s, -s))
    assert q.integer_spec().codes.tolist() == [-1, 1]


def test_step_stays_positive():
    q = make_quantizer("lsq", "weight", 4, signed=True)
    q.initialize(torch.zeros(5, 5))
    assert float(q.step.detach()) > 0
    assert bool(torch.isfinite(q(torch.randn(5, 5))).all())


@pytest.mark.parametrize("bits", [2, 4])
def test_training_a_tiny_model_lowers_the_loss(train_tiny, bits):
    losses = train_tiny("lsq", bits)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("signed", [False, True])
def test_least_squares_step_rounds_an_eight_bit_tensor_finer_than_the_paper_rule(signed):
    """``initialize_least_squares`` (8-bit LSQ) beats the paper's low-bit rule at 8 bits and
    is within a few percent of the best nearby step (it searches a grid of candidates)."""
    torch.manual_seed(0)
    x = torch.randn(64, 8, 6, 6)
    x = x if signed else x.relu()
    paper, fitted = (LSQActivationQuantizer(8, signed=signed) for _ in range(2))
    paper.step.data.fill_(2 * float(x.abs().mean()) / math.sqrt(paper.q_p))
    fitted.initialize_least_squares(x)

    def error(quantizer):
        with torch.no_grad():
            return float((quantizer(x) - x).pow(2).mean())

    assert error(fitted) < error(paper) / 4
    best = error(fitted)
    for ratio in (0.9, 0.97, 1.03, 1.1):
        other = LSQActivationQuantizer(8, signed=signed)
        other.step.data = fitted.step.data * ratio
        assert error(other) >= best * 0.95
