"""Quantization Networks (Yang et al. 2019): sigmoid sum, temperature, staircase, k-means init."""

import math

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torch.func import functional_call

import qcompile
from qcompile.quant import get_method, make_quantizer
from qcompile.quant import qn
from qcompile.quant.qn import QNActivationQuantizer, QNWeightQuantizer


def set_function(q, alpha, beta, biases):
    with torch.no_grad():
        q.log_alpha.fill_(math.log(alpha))
        q.log_beta.fill_(math.log(beta))
        q.biases.copy_(torch.tensor(biases).expand_as(q.biases))
    return q


def test_registered_with_both_roles():
    method = get_method("qn")
    assert method.weight is QNWeightQuantizer and method.activation is QNActivationQuantizer


@pytest.mark.parametrize("bits,signed,values", [(1, True, [-1, 1]), (2, True, [-1, 0, 1]),
                                                (3, True, [-3, -2, -1, 0, 1, 2, 3]),
                                                (2, False, [0, 1, 2, 3])])
def test_quantization_values(bits, signed, values):
    q = make_quantizer("qn", "weight", bits, signed=signed)
    assert q.integer_spec().codes.tolist() == values


def test_soft_forward_is_the_papers_sigmoid_sum():
    """y = alpha * (sum_i s_i sigmoid(T (beta x - b_i)) - o), o = half the sum of the s_i."""
    q = set_function(make_quantizer("qn", "weight", 2, signed=True), 0.7, 2.0, [-0.4, 0.9])
    q.set_temperature(3.0)
    x = torch.linspace(-2, 2, 401)
    expected = 0.7 * (torch.sigmoid(3.0 * (2.0 * x + 0.4)) + torch.sigmoid(3.0 * (2.0 * x - 0.9))
                      - 1.0)
    torch.testing.assert_close(q(x), expected)


def test_binary_soft_forward_has_a_step_of_two():
    """Binary weights {-1, 1}: one sigmoid of height s_1 = 2, offset o = 1, per channel."""
    q = make_quantizer("qn", "weight", 1, signed=True, per_channel=True, channels=2)
    set_function(q, 0.5, 1.5, [0.2])
    with torch.no_grad():
        q.biases[1].fill_(-0.3)
    q.set_temperature(4.0)
    x = torch.linspace(-2, 2, 202).reshape(2, -1)
    biases = torch.tensor([[0.2], [-0.3]])
    expected = 0.5 * (2 * torch.sigmoid(4.0 * (1.5 * x - biases)) - 1)
    torch.testing.assert_close(q(x), expected)


def test_hard_forward_is_the_unit_step_sum():
    q = set_function(make_quantizer("qn", "activation", 2, signed=False), 0.5, 4.0,
                     [0.6, 1.3, 3.1])
    q.set_hard()
    x = torch.linspace(-1, 2, 3001)
    steps = (4.0 * x.unsqueeze(-1) - torch.tensor([0.6, 1.3, 3.1]) > 0).float().sum(-1)
    off_threshold = ~torch.isclose(4.0 * x.unsqueeze(-1), torch.tensor([0.6, 1.3, 3.1])).any(-1)
    torch.testing.assert_close(q(x)[off_threshold], (0.5 * steps)[off_threshold])
    spec = q.integer_spec()
    torch.testing.assert_close(spec.thresholds, torch.tensor([0.6, 1.3, 3.1]) / 4.0)


def test_soft_approaches_the_staircase_as_temperature_grows():
    q = set_function(make_quantizer("qn", "weight", 3, signed=True), 0.3, 1.5,
                     [-2.4, -1.5, -0.5, 0.4, 1.6, 2.2])
    x = torch.linspace(-3, 3, 6001)
    hard = q.set_hard(True)(x)
    thresholds = q.integer_spec().thresholds
    away = (x.unsqueeze(-1) - thresholds).abs().min(-1).values > 0.02
    q.set_hard(False)
    gaps = []
    for temperature in (1.0, 10.0, 100.0, 1000.0):
        q.set_temperature(temperature)
        gaps.append((q(x) - hard)[away].abs().max().item())
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-6
    assert len(torch.unique(q(x))) > 2**3


def test_soft_forward_is_differentiable_in_thresholds_scales_and_input():
    q = make_quantizer("qn", "weight", 2, signed=True, per_channel=True, channels=2).double()
    q.set_temperature(2.0)
    x = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    names = ("log_alpha", "log_beta", "biases")

    def function(x, *params):
        return functional_call(q, dict(zip(names, params)), (x,))

    inputs = (x, *(getattr(q, name).detach().clone() for name in names))
    inputs = tuple(t.requires_grad_(True) for t in inputs)
    assert torch.autograd.gradcheck(function, inputs)
    q(x).sum().backward()
    assert bool((q.biases.grad != 0).all())


@pytest.mark.parametrize("bits", [2, 4])
def test_fixed_thresholds_change_nothing_but_their_own_gradient(bits):
    """``learn_thresholds(False)``: the same function and the same gradients for the input and
    both scales; none for the thresholds, which a learned quantizer does get."""
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    results = []
    for learned in (True, False):
        q = make_quantizer("qn", "weight", bits, signed=True, per_channel=True, channels=4)
        q.initialize(x)
        q.set_temperature(5.0).learn_thresholds(learned)
        assert q.thresholds_learned is learned and q.biases.requires_grad is learned
        xg = x.clone().requires_grad_(True)
        y = q(xg)
        (y * torch.linspace(-1, 1, 50)).sum().backward()
        results.append([y.detach(), xg.grad, q.log_alpha.grad, q.log_beta.grad])
        assert (q.biases.grad is not None and bool(q.biases.grad.abs().sum() > 0)) is learned
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_fix_thresholds_fixes_every_qn_quantizer_of_a_model():
    from qcompile.models import SmallCNN

    x = torch.randn(2, 1, 28, 28)
    qn_model = qcompile.quantize(SmallCNN(), (x,), bits=2, method="qn", calib_data=[(x,)])
    quantizers = [m for m in qn_model.modules() if isinstance(m, qn.QNQuantizer)]
    assert qn.fix_thresholds(qn_model) == len(quantizers) > 0
    assert not any(q.thresholds_learned or q.biases.requires_grad for q in quantizers)
    lsq_model = qcompile.quantize(SmallCNN(), (x,), bits=2, method="lsq", calib_data=[(x,)])
    assert qn.fix_thresholds(lsq_model) == 0


def test_hard_mode_gradient_comes_from_the_soft_function():
    q = make_quantizer("qn", "weight", 2, signed=True).set_hard()
    x = torch.randn(50, generator=torch.Generator().manual_seed(0), requires_grad=True)
    q(x).sum().backward()
    q_soft = make_quantizer("qn", "weight", 2, signed=True)
    x_soft = x.detach().clone().requires_grad_(True)
    q_soft(x_soft).sum().backward()
    torch.testing.assert_close(x.grad, x_soft.grad)
    torch.testing.assert_close(q.biases.grad, q_soft.biases.grad)


def test_initialize_fits_a_uniform_grid_with_midpoint_thresholds():
    """Three well-separated clusters, ternary: each cluster gets one code, in order, and the
    thresholds start halfway between levels on the least-squares grid."""
    from qcompile.quant.fit import best_steps

    gen = torch.Generator().manual_seed(1)
    centers = torch.tensor([-0.8, 0.05, 0.6])
    w = (centers[torch.randint(0, 3, (3000,), generator=gen)]
         + 0.02 * torch.randn(3000, generator=gen))
    q = make_quantizer("qn", "weight", 2, signed=True)
    q.initialize(w)
    step = best_steps(w.reshape(1, -1), -1, 1)
    torch.testing.assert_close(q.alpha.detach(), step)
    torch.testing.assert_close(q.beta.detach(), 1 / step)
    t = q.integer_spec().thresholds
    torch.testing.assert_close(t, torch.cat([-step, step]) / 2)
    codes = q.integer_spec().quantize(centers)
    assert codes.tolist() == [-1, 0, 1]


def test_eval_mode_uses_the_staircase():
    q = make_quantizer("qn", "activation", 2, signed=False)
    q.initialize(torch.rand(1000))
    x = torch.rand(50)
    q.eval()
    spec = q.integer_spec()
    assert torch.equal(q(x), spec.dequantize(spec.quantize(x)))
    q.train()
    assert not torch.equal(q(x), spec.dequantize(spec.quantize(x)))


def test_initialize_per_channel_fits_each_channel():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4, 200, generator=gen) * torch.tensor([[0.01], [0.1], [1.0], [10.0]])
    q = make_quantizer("qn", "weight", 3, signed=True, per_channel=True, channels=4)
    q.initialize(w)
    spec = q.integer_spec()
    spread = spec.thresholds[:, -1] - spec.thresholds[:, 0]
    assert bool((spread[1:] / spread[:-1] > 5).all())


def train_with_rising_temperature(bits, steps=60):
    """Fit a QN-quantized linear layer while T rises from 1 to 30; hard losses before and after."""
    gen = torch.Generator().manual_seed(bits)
    teacher = torch.randn(4, 8, generator=gen) * 0.5
    inputs = torch.rand(128, 8, generator=gen)
    targets = inputs @ teacher.t()
    weight = torch.nn.Parameter(teacher + 0.3 * torch.randn(4, 8, generator=gen))
    qw = make_quantizer("qn", "weight", bits, signed=True, per_channel=True, channels=4)
    qa = make_quantizer("qn", "activation", bits, signed=False)
    qw.initialize(weight.detach())
    qa.initialize(inputs)

    def loss(hard):
        qw.set_hard(hard)
        qa.set_hard(hard)
        return F.mse_loss(F.linear(qa(inputs), qw(weight)), targets)

    hard_before = loss(True).item()
    optimizer = torch.optim.Adam([weight, *qw.parameters(), *qa.parameters()], lr=1e-2)
    soft_losses = []
    for step in range(steps):
        for q in (qw, qa):
            q.set_temperature(30.0 ** (step / (steps - 1)))
        optimizer.zero_grad()
        current = loss(False)
        current.backward()
        optimizer.step()
        soft_losses.append(current.item())
    return soft_losses, hard_before, loss(True).item()


@pytest.mark.parametrize("bits", [2, 4])
def test_tiny_layer_trains_while_the_temperature_rises(bits):
    soft_losses, hard_before, hard_after = train_with_rising_temperature(bits)
    assert soft_losses[-1] < 0.5 * soft_losses[0]
    assert hard_after < hard_before


def test_tiny_layer_trains_with_the_shared_loop(train_tiny):
    losses = train_tiny("qn", 3)
    assert losses[-1] < 0.5 * losses[0]


def test_scales_survive_ordinary_optimizer_steps():
    """Tiny scales (an 8-bit layer's alpha is ~1e-4) stay positive under Adam at lr 3e-3."""
    w = 1e-3 * torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    q = make_quantizer("qn", "weight", 8, signed=True).set_hard()
    q.initialize(w)
    assert float(q.alpha.detach()) < 1e-4
    optimizer = torch.optim.Adam(q.parameters(), lr=3e-3)
    target = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)) * 1e-3
    for _ in range(20):
        loss = ((q(w) - target) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(q.alpha.detach()) > 0 and float(q.beta.detach()) > 0
    assert q(w).unique().numel() > 16


def compiled_backward_sigmoids(q, x) -> tuple[int, list[torch.Tensor]]:
    """How many sigmoids inductor's code for ``q``'s backward pass on ``x`` evaluates (each is a
    vectorized ``exp`` of the negated argument), and the compiled value and gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(q, dynamic=False, fullgraph=True)
    results = []

    def step():
        results.extend(value_and_gradients(compiled, q, x))

    _, (forward_code, backward_code) = run_and_get_code(step)
    assert forward_code.count(".neg().exp()") == len(q.heights)
    return backward_code.count(".neg().exp()"), results


def value_and_gradients(forward, q, x) -> list[torch.Tensor]:
    q.zero_grad()
    xg = x.clone().requires_grad_(True)
    y = forward(xg)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return [y.detach(), xg.grad] + [p.grad.clone() for p in q.parameters()]


@pytest.mark.parametrize("bits, kept", [(2, True), (3, False)])
def test_a_compiled_backward_reads_the_forwards_sigmoids_up_to_two_bits(bits, kept, monkeypatch):
    """With at most KEPT_SIGMOIDS thresholds the compiled backward evaluates no sigmoid (it reads
    the forward's); left to the partitioner it evaluates all of them again, as at 3 bits. The
    value and gradients are eager's either way."""
    torch.manual_seed(0)
    q = make_quantizer("qn", "activation", bits, signed=False)
    x = torch.relu(torch.randn(4, 3, 8, 8))
    q.initialize(x)
    q.train().set_temperature(5.0)
    recomputed, compiled = compiled_backward_sigmoids(q, x)
    assert recomputed == (0 if kept else len(q.heights))
    if kept:
        monkeypatch.setattr(qn, "KEPT_SIGMOIDS", 0)
        assert compiled_backward_sigmoids(q, x)[0] == len(q.heights)
    for got, want in zip(compiled, value_and_gradients(q, q, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
