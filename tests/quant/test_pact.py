"""PACT (Choi et al. 2018): clipping to a learned alpha, its gradient, init, and DoReFa weights."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.errors import ConfigError
from qcompile.quant import get_method, make_quantizer
from qcompile.quant.dorefa import DoReFaWeightQuantizer
from qcompile.quant.pact import Clip, PACTActivationQuantizer, PACTWeightQuantizer


def pact(bits, alpha, signed=False):
    q = make_quantizer("pact", "activation", bits, signed=signed)
    with torch.no_grad():
        q.alpha.fill_(alpha)
    return q


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_forward_is_eq2_on_the_clipped_input(bits):
    alpha, n = 2.5, 2**bits - 1
    x = torch.linspace(-3, 6, 1001, dtype=torch.float64).float()
    y = pact(bits, alpha)(x).detach()
    clipped = x.double().clamp(0, alpha)
    expected = torch.round(clipped * n / alpha) * alpha / n
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-6)
    assert float(y.min()) == 0 and float(y.max()) == pytest.approx(alpha)


def test_alpha_gradient_is_one_where_input_reaches_alpha():
    q = pact(3, 1.5)
    x = torch.tensor([-1.0, 0.0, 0.7, 1.49, 1.5, 2.0, 40.0], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    (q(x) * upstream).sum().backward()
    assert q.alpha.grad.tolist() == [5.0 + 6.0 + 7.0]
    assert x.grad.tolist() == [0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0]


def test_signed_clips_symmetrically_with_negative_alpha_gradient():
    q = pact(3, 1.5, signed=True)
    x = torch.tensor([-9.0, -1.5, -0.2, 0.4, 1.5, 3.0], requires_grad=True)
    y = q(x)
    assert y.tolist()[0] == -1.5 and y.tolist()[-1] == 1.5
    assert q.integer_spec().codes.tolist() == list(range(-3, 4))
    y.sum().backward()
    assert q.alpha.grad.tolist() == [-1.0 - 1.0 + 1.0 + 1.0]


def test_signed_one_bit_is_refused():
    with pytest.raises(ConfigError, match="bits >= 2"):
        make_quantizer("pact", "activation", 1, signed=True)


@pytest.mark.parametrize("bits", [2, 4])
def test_alpha_initialized_at_the_clip_of_least_squared_error(bits):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, 6, 6, generator=gen).relu()
    x[0, 0, 0, 0] = 1e4
    q = make_quantizer("pact", "activation", bits, signed=False)
    q.initialize(x)
    assert float(q.alpha.detach()) < 10, "a lone outlier must not set alpha"

    body = x.reshape(-1)[1:]

    def error(alpha):
        step = alpha / (2**bits - 1)
        rounded = torch.clamp(torch.round(body / step), 0, 2**bits - 1) * step
        return float(((rounded - body) ** 2).mean())

    chosen = error(q.alpha.detach())
    for other in (torch.quantile(body, 0.999), body.max(), 0.5 * q.alpha.detach()):
        assert chosen <= error(other) * 1.1  # the search runs on a sample, over a grid


def test_alpha_init_falls_back_when_calibration_is_silent():
    q = make_quantizer("pact", "activation", 4, signed=False)
    q.initialize(-torch.rand(100))
    assert float(q.alpha.detach()) == 1.0
    sparse = torch.zeros(10000)
    sparse[3] = 2.0
    q.initialize(sparse)
    assert float(q.alpha.detach()) == 2.0


def test_alpha_pushed_below_zero_recovers():
    q = pact(2, 1.0)
    with torch.no_grad():
        q.alpha.fill_(-0.5)
    x = torch.full((8,), 3.0)
    ((q(x) - 3.0) ** 2).sum().backward()
    assert float(q.alpha.grad) < 0, "the gradient must push alpha back up"


def test_weights_use_dorefa():
    method = get_method("pact")
    assert method.activation is PACTActivationQuantizer
    assert issubclass(method.weight, DoReFaWeightQuantizer)
    assert PACTWeightQuantizer.method == "pact" and DoReFaWeightQuantizer.method == "dorefa"
    w = torch.randn(4, 9)
    pact_q = make_quantizer("pact", "weight", 3, signed=True)
    dorefa_q = make_quantizer("dorefa", "weight", 3, signed=True)
    assert torch.equal(pact_q(w), dorefa_q(w))


@pytest.mark.parametrize("bits", [2, 4])
def test_training_a_tiny_model_lowers_the_loss(train_tiny, bits):
    losses = train_tiny("pact", bits)
    assert losses[-1] < 0.7 * losses[0]


@settings(max_examples=40, deadline=None)
@given(signed=st.booleans(), per_channel=st.booleans(), seed=st.integers(0, 2**16))
def test_clip_gradients_equal_autograd_of_the_where_form(signed, per_channel, seed):
    """The written-out backward is the gradient autograd takes through ``torch.where``.

    In float64: the two sum ``alpha``'s gradient in different orders, which in float32 differ by
    a few units in the last place of a sum of up to 300 terms."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64) * 2
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, -1.0])  # ties at 0 and at +-alpha
    alpha = torch.rand(3 if per_channel else 1, generator=generator, dtype=torch.float64) + 0.5
    alpha[0] = 1.0
    shape = [1, 3, 1, 1] if per_channel else [1, 1, 1, 1]
    upstream = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    grads = []
    for written_out in (True, False):
        xs, a = x.clone().requires_grad_(), alpha.clone().requires_grad_()
        if written_out:
            y = Clip.apply(xs, a.reshape(shape), signed)
        else:
            at = a.reshape(shape)
            lower = torch.where(xs <= -at, -at, xs) if signed else torch.relu(xs)
            y = torch.where(xs >= at, at, lower)
        (y * upstream).sum().backward()
        grads.append((y.detach(), xs.grad, a.grad))
    for mine, reference in zip(*grads):
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-12)
