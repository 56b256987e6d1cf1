"""Tests of ConvBatchNorm, the layer + batch norm pair that QAT trains with the BN folded in."""

import copy

import pytest
import torch
from torch import nn

from qcompile.fused import ConvBatchNorm
from qcompile.quant.base import round_ste

LAYERS = {
    "conv2d": ((8, 3, 6, 6), lambda: nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d),
    "depthwise": ((8, 4, 5, 5), lambda: nn.Conv2d(4, 8, 3, groups=4, bias=False), nn.BatchNorm2d),
    "conv1d": ((8, 3, 9), lambda: nn.Conv1d(3, 6, 3, stride=2), nn.BatchNorm1d),
    "linear": ((8, 7), lambda: nn.Linear(7, 6), nn.BatchNorm1d),
}


@pytest.fixture(params=sorted(LAYERS))
def pair(request):
    """An eval-mode (layer, BN) with non-trivial BN state, a ConvBatchNorm of copies, an input."""
    shape, make_layer, bn_type = LAYERS[request.param]
    torch.manual_seed(8)
    layer = make_layer()
    bn = bn_type(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.normal_(0, 0.2)
    original = nn.Sequential(layer, bn).eval()
    fused = ConvBatchNorm(copy.deepcopy(layer), copy.deepcopy(bn))
    return original, fused, torch.randn(*shape)


def running_folded_weight(layer: nn.Module, bn: nn.Module) -> torch.Tensor:
    """``w * gamma / sqrt(running_var + eps)`` per output channel, computed independently."""
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (layer.weight * factor.reshape(-1, *[1] * (layer.weight.dim() - 1))).detach()


def with_parameters(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    plain = copy.deepcopy(layer)
    plain.weight = nn.Parameter(weight.detach())
    plain.bias = nn.Parameter(bias.detach())
    return plain


class RecordingRound(nn.Module):
    """A stand-in weight quantizer: rounds to multiples of 1/4 and remembers its input."""

    def forward(self, w):
        self.seen = w.detach().clone()
        return round_ste(w * 4) / 4


def test_is_eval_equivalent_to_the_pair_and_keeps_its_mode(pair):
    original, fused, x = pair
    assert not fused.training
    with torch.no_grad():
        torch.testing.assert_close(fused(x), original(x), rtol=1e-4, atol=1e-5)


def test_train_mode_matches_outputs_and_running_statistics(pair):
    original, fused, x = pair
    original.train()
    fused.train()
    for step in range(3):
        batch = x * (1 + step) - step
        torch.testing.assert_close(fused(batch), original(batch), rtol=1e-4, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused.bn, name), getattr(original[1], name))


@pytest.mark.parametrize("training", [True, False])
def test_the_quantizer_sees_the_folded_weight(pair, training):
    original, fused, x = pair
    fused.weight_quantizer = RecordingRound()
    fused.train(training)
    folded = running_folded_weight(*original)
    out = fused(x)
    torch.testing.assert_close(fused.weight_quantizer.seen, folded)
    if not training:
        deployed = with_parameters(original[0], torch.round(folded * 4) / 4, fused.folded_bias())
        torch.testing.assert_close(out, deployed(x))


@pytest.mark.parametrize("quantizer", [nn.Identity, RecordingRound])
def test_to_folded_is_a_plain_layer_computing_the_eval_output(pair, quantizer):
    _, fused, x = pair
    fused.weight_quantizer = quantizer()
    plain = fused.to_folded()
    assert type(plain) is type(fused.layer)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), fused(x))


@pytest.mark.parametrize("training", [True, False])
def test_gradients_reach_the_layer_weight_and_bn_affine(pair, training):
    _, fused, x = pair
    fused.train(training)
    fused.weight_quantizer = RecordingRound()
    out = fused(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(6))).sum().backward()
    for param in (fused.layer.weight, fused.bn.weight, fused.bn.bias):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_frozen_statistics_train_with_the_folded_form(pair):
    original, fused, x = pair
    fused.train().freeze_statistics()
    before = fused.bn.running_mean.clone()
    out = fused(x)
    torch.testing.assert_close(fused.bn.running_mean, before)
    with torch.no_grad():
        torch.testing.assert_close(out, original(x), rtol=1e-4, atol=1e-5)


def test_a_channel_with_zero_gamma_trains_without_dividing_by_zero():
    torch.manual_seed(7)
    original = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with torch.no_grad():
        original[1].weight[1] = 0.0
    fused = ConvBatchNorm(*copy.deepcopy(original))
    x = torch.randn(4, 3, 6, 6)
    out = fused(x)
    torch.testing.assert_close(out, original(x), rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(fused.layer.weight.grad).all()
