"""Tests of the fold-bn pass (eval and QAT modes) and of the ConvBatchNorm module."""

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qcompile
from qcompile.errors import ConfigError
from qcompile.fused import ConvBatchNorm

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def randomize_batch_norms(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters, so folding is not identity."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BATCH_NORMS) and module.track_running_stats:
                shape, kw = module.running_mean.shape, {"generator": generator}
                module.running_mean.copy_(torch.randn(shape, **kw) * 0.5)
                module.running_var.copy_(torch.rand(shape, **kw) * 1.5 + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(shape, **kw) + 0.5)
                    module.bias.copy_(torch.randn(shape, **kw) * 0.2)
    return model


def run_fold_bn(model: nn.Module, x: torch.Tensor, spec: str = "fold-bn"):
    """Trace ``model`` and run only fold-bn on it; returns the result and the pass's notes."""
    ctx = qcompile.PassContext()
    gm = qcompile.PassManager(spec).run(qcompile.trace(model, (x,)), (x,), ctx=ctx)
    gm.graph.lint()
    return gm, ctx.record_of("fold-bn").notes


def count_batch_norms(module: nn.Module) -> int:
    return sum(isinstance(m, BATCH_NORMS) for m in module.modules())


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """rtol 1e-4 plus atol 1e-5 of the output's largest magnitude.

    Folding reorders float32 roundings (the BN scale multiplies the weight instead of the
    accumulated output), so each layer differs by a few ulps of its output; through a deep
    network this measures about 1e-6 of the output scale. Elements near zero (cancellation) can
    only be held to that absolute scale, so atol = 1e-5 * max|expected| leaves a 10x margin
    while a wrong fold (a missing eps, mean or gamma) moves outputs by far more.
    """
    atol = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol)


@pytest.mark.parametrize(
    "name, size",
    [("resnet18", 64), ("resnet50", 64), ("mobilenet_v2", 64), ("alexnet", 64), ("vgg11_bn", 32)],
)
def test_eval_fold_keeps_torchvision_outputs_and_removes_every_batch_norm(name, size):
    generator = torch.Generator().manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    model = randomize_batch_norms(model, generator).eval()
    x = torch.randn(2, 3, size, size, generator=generator)
    batch_norms = count_batch_norms(model)

    gm, notes = run_fold_bn(model, x)

    with torch.no_grad():
        assert_close_to_scale(gm(x), model(x))
    assert count_batch_norms(gm) == 0
    modules = dict(gm.named_modules())
    called = [modules[n.target] for n in gm.graph.nodes if n.op == "call_module"]
    assert not any(isinstance(m, BATCH_NORMS) for m in called)
    assert f"folded {batch_norms} BatchNorm layer(s) (eval mode)" in notes


@st.composite
def conv_bn_pairs(draw):
    """A Conv1d/Conv2d (grouped, depthwise, with or without bias) and a BN with random state."""
    dims = draw(st.sampled_from([1, 2]))
    groups = draw(st.integers(1, 4))
    if draw(st.booleans()):
        in_channels = out_channels = groups
    else:
        in_channels = groups * draw(st.integers(1, 3))
        out_channels = groups * draw(st.integers(1, 3))
    conv_type, bn_type = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
    conv = conv_type(
        in_channels,
        out_channels,
        kernel_size=draw(st.integers(1, 3)),
        stride=draw(st.integers(1, 2)),
        padding=draw(st.integers(0, 1)),
        groups=groups,
        bias=draw(st.booleans()),
    )
    bn = bn_type(out_channels, eps=draw(st.sampled_from([1e-8, 1e-5, 1e-3, 0.1])))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    log10_var = torch.rand(out_channels, generator=generator) * 7 - 6
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        bn.running_mean.copy_(torch.randn(out_channels, generator=generator))
        bn.running_var.copy_(10.0**log10_var)
        bn.weight.copy_(torch.randn(out_channels, generator=generator))
        bn.bias.copy_(torch.randn(out_channels, generator=generator))
    x = torch.randn(2, in_channels, *[draw(st.integers(3, 7))] * dims, generator=generator)
    return nn.Sequential(conv, bn).eval(), x


@settings(max_examples=40, deadline=None)
@given(conv_bn_pairs())
def test_eval_fold_is_exact_on_random_conv_bn_pairs(case):
    model, x = case
    gm, _ = run_fold_bn(model, x)
    assert count_batch_norms(gm) == 0
    assert gm.get_submodule("0").bias is not None
    with torch.no_grad():
        assert_close_to_scale(gm(x), model(x))


class MixedLayers(nn.Module):
    """Conv1d+BN1d, a bias-free Linear+BN1d, and a BN without affine parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3)
        self.bn1 = nn.BatchNorm1d(6, affine=False)
        self.linear = nn.Linear(6 * 6, 5, bias=False)
        self.bn2 = nn.BatchNorm1d(5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv(x)))
        return self.bn2(self.linear(y.flatten(1)))


def test_eval_fold_handles_conv1d_linear_and_non_affine_batch_norms():
    model = randomize_batch_norms(MixedLayers(), torch.Generator().manual_seed(1)).eval()
    x = torch.randn(4, 3, 8)
    gm, notes = run_fold_bn(model, x)
    assert count_batch_norms(gm) == 0
    assert "folded 2 BatchNorm layer(s) (eval mode)" in notes
    with torch.no_grad():
        assert_close_to_scale(gm(x), model(x))


def test_training_mode_model_folds_with_running_statistics_and_says_so():
    model = randomize_batch_norms(MixedLayers(), torch.Generator().manual_seed(2)).train()
    x = torch.randn(4, 3, 8)
    gm, notes = run_fold_bn(model, x)
    assert count_batch_norms(gm) == 0
    assert any("running statistics" in note for note in notes)
    with torch.no_grad():
        assert_close_to_scale(gm.eval()(x), model.eval()(x))


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + torch.sigmoid(y)


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


class NoRunningStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


class AfterReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


class AfterInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x)


class LinearOverSequence(nn.Module):
    """BatchNorm1d normalises dim 1, here the sequence, not the Linear's features."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.linear(x))


@pytest.mark.parametrize(
    "model_type, shape, reason",
    [
        (TwoUsers, (2, 3, 8, 8), "also used by"),
        (SharedConv, (2, 3, 8, 8), "module 'conv' is shared: 2 nodes"),
        (NoRunningStats, (2, 3, 8, 8), "no running statistics"),
        (AfterReLU, (2, 3, 8, 8), "is not the output of a Conv1d, Conv2d or Linear"),
        (AfterInput, (2, 3, 8, 8), "is not the output of a Conv1d, Conv2d or Linear"),
        (LinearOverSequence, (2, 5, 5), "shape mismatch"),
    ],
)
@pytest.mark.parametrize("mode", ["eval", "qat"])
def test_batch_norm_that_cannot_fold_stays_with_a_note(model_type, shape, reason, mode):
    model = randomize_batch_norms(model_type(), torch.Generator().manual_seed(3)).eval()
    x = torch.randn(*shape)
    gm, notes = run_fold_bn(model, x, f"fold-bn{{mode={mode}}}")
    assert count_batch_norms(gm) == 1
    assert not any(isinstance(m, ConvBatchNorm) for m in gm.modules())
    assert any(note.startswith("kept bn: ") and reason in note for note in notes), notes
    assert f"folded 0 BatchNorm layer(s) ({mode} mode)" in notes
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_unknown_mode_is_a_config_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="mode must be one of eval, qat"):
        run_fold_bn(model, x, "fold-bn{mode=train}")


QAT_CASES = {
    "conv2d": ((8, 3, 6, 6), lambda: nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d),
    "depthwise": ((8, 4, 5, 5), lambda: nn.Conv2d(4, 8, 3, groups=4, bias=False), nn.BatchNorm2d),
    "conv1d": ((8, 3, 9), lambda: nn.Conv1d(3, 6, 3, stride=2), nn.BatchNorm1d),
    "linear": ((8, 7), lambda: nn.Linear(7, 6), nn.BatchNorm1d),
}


@pytest.fixture(params=sorted(QAT_CASES))
def qat_case(request):
    """An eval-mode (layer, BN, ReLU) model, its QAT-folded graph, and an input."""
    shape, make_layer, bn_type = QAT_CASES[request.param]
    generator = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    layer = make_layer()
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    model = nn.Sequential(layer, bn_type(channels), nn.ReLU())
    model = randomize_batch_norms(model, generator).eval()
    x = torch.randn(*shape, generator=generator)
    gm, notes = run_fold_bn(model, x, "fold-bn{mode=qat}")
    assert "folded 1 BatchNorm layer(s) (qat mode)" in notes
    return model, gm, x


def fused_of(gm) -> ConvBatchNorm:
    (fused,) = [m for m in gm.modules() if isinstance(m, ConvBatchNorm)]
    return fused


def test_qat_fold_in_eval_mode_equals_the_original(qat_case):
    model, gm, x = qat_case
    assert isinstance(gm.get_submodule("0"), ConvBatchNorm)
    assert not [n for n in gm.graph.nodes if n.target == "1"]
    with torch.no_grad():
        assert_close_to_scale(gm(x), model(x))


def test_qat_fold_in_train_mode_matches_outputs_and_running_statistics(qat_case):
    model, gm, x = qat_case
    model.train()
    bn = fused_of(gm.train()).bn
    for step in range(3):
        batch = x * (1 + step) + step
        assert_close_to_scale(gm(batch), model(batch))
    torch.testing.assert_close(bn.running_mean, model[1].running_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, model[1].running_var, rtol=1e-4, atol=1e-5)
    assert bn.num_batches_tracked.item() == model[1].num_batches_tracked.item() == 3


def test_qat_fold_of_resnet18_matches_in_eval_and_train_and_retraces_whole():
    generator = torch.Generator().manual_seed(5)
    model = randomize_batch_norms(torchvision.models.resnet18(weights=None), generator).eval()
    x = torch.randn(2, 3, 64, 64, generator=generator)
    gm, _ = run_fold_bn(model, x, "fold-bn{mode=qat}")
    assert sum(isinstance(m, ConvBatchNorm) for m in gm.modules()) == 20
    assert count_batch_norms(gm) == 20
    with torch.no_grad():
        assert_close_to_scale(gm(x), model(x))
    retraced = qcompile.trace(gm, (x,))
    modules = dict(retraced.named_modules())
    called = [modules[n.target] for n in retraced.graph.nodes if n.op == "call_module"]
    assert sum(isinstance(m, ConvBatchNorm) for m in called) == 20
    assert_close_to_scale(gm.train()(x), model.train()(x))
