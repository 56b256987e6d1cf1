"""The torch.export frontend: lifted graphs compute what ep.module() computes, with modules back."""

import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qcompile
from qcompile.errors import ModelLoadError
from qcompile.ir.export_frontend import from_exported_program

aten = torch.ops.aten
RAISED_OPS = {
    aten.conv1d.default,
    aten.conv2d.default,
    aten.convolution.default,
    aten.linear.default,
    aten.batch_norm.default,
    aten._native_batch_norm_legit_no_training.default,
}
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


class SmallCNN(nn.Module):
    """Conv1d/BN1d and Conv2d/BN2d branches, in-place ops, a shared layer and two outputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(True))
        self.conv1d = nn.Conv1d(8, 4, 3, padding=1, bias=False)
        self.bn1d = nn.BatchNorm1d(4)
        self.head = nn.Linear(4 * 16, 6)
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        y = self.stem(x)
        y = y + self.stem[0](x)
        y = F.max_pool2d(y, 2).flatten(2)
        z = self.bn1d(self.conv1d(y))
        z.mul_(self.scale)
        return {"logits": self.head(z.flatten(1)), "features": F.relu6(z)}


def lifted(model: nn.Module, x: torch.Tensor):
    ep = torch.export.export(model.eval(), (x,))
    return ep, from_exported_program(ep)


def _seeded(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics, so a wrongly wired BN changes the output."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model


def assert_layers_at_original_paths(model: nn.Module, gm: torch.fx.GraphModule) -> None:
    lifted_modules = dict(gm.named_modules())
    originals = [(p, m) for p, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    assert originals
    for path, original in originals:
        assert type(lifted_modules[path]) is type(original), path
        assert lifted_modules[path].extra_repr() == original.extra_repr(), path
        for name, tensor in original.state_dict().items():
            assert torch.equal(lifted_modules[path].state_dict()[name], tensor), f"{path}.{name}"


def called_modules(gm: torch.fx.GraphModule) -> set[str]:
    return {n.target for n in gm.graph.nodes if n.op == "call_module"}


def test_resnet18_lifts_to_modules_at_original_paths():
    model = _seeded(torchvision.models.resnet18(weights=None))
    x = torch.randn(1, 3, 64, 64)
    ep, gm = lifted(model, x)

    torch.testing.assert_close(gm(x), ep.module()(x), rtol=0, atol=0)
    assert_layers_at_original_paths(model, gm)
    assert {"conv1", "bn1", "layer1.0.conv1", "layer4.1.bn2", "fc"} <= called_modules(gm)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert not targets & RAISED_OPS
    assert operator.add in targets and F.relu in targets
    assert not any(getattr(t, "_schema", None) and t._schema.is_mutable for t in targets)


def test_small_cnn_with_shared_layer_and_dict_output():
    model = _seeded(SmallCNN())
    x = torch.randn(2, 3, 8, 8)
    ep, gm = lifted(model, x)

    expected, got = ep.module()(x), gm(x)
    assert got.keys() == expected.keys()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert_layers_at_original_paths(model, gm)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls.count("stem.0") == 2
    assert {"stem.1", "conv1d", "bn1d", "head"} <= set(calls)


def test_mutation_seen_through_an_alias_stays_in_place():
    class AliasedInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            y.view(-1).relu_()
            return y * 2

    x = torch.randn(1, 2, 4, 4)
    ep, gm = lifted(AliasedInPlace(), x)
    torch.testing.assert_close(gm(x), ep.module()(x), rtol=0, atol=0)
    assert (gm(x) >= 0).all()


def test_pools_flatten_and_cat_become_the_torch_functions_the_passes_match():
    class Pools(nn.Module):
        def __init__(self):
            super().__init__()
            self.left, self.right = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            joined = torch.cat([F.max_pool2d(self.left(x), 2), F.avg_pool2d(self.right(x), 2)], 1)
            return self.head(torch.flatten(F.adaptive_avg_pool2d(joined, 1), 1))

    x = torch.randn(2, 3, 8, 8)
    ep, gm = lifted(Pools(), x)
    torch.testing.assert_close(gm(x), ep.module()(x), rtol=0, atol=0)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert targets == {F.max_pool2d, F.avg_pool2d, torch.cat, F.adaptive_avg_pool2d,
                       torch.flatten}


def test_an_in_place_op_on_a_flattened_view_stays_in_place():
    """``torch.flatten`` may return a view: ReLU on it in place also changes what it flattened."""
    class FlattenedInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            y.flatten(1).relu_()
            return y * 2

    x = torch.randn(1, 2, 4, 4)
    ep, gm = lifted(FlattenedInPlace(), x)
    torch.testing.assert_close(gm(x), ep.module()(x), rtol=0, atol=0)
    assert (gm(x) >= 0).all()


class ClassicHead(nn.Module):
    """``x.view(x.size(0), -1)`` before the classifier, as much hand-written model code has it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_view_of_the_batch_runs_at_every_batch_size_and_canonicalizes_to_flatten(dynamic):
    """Exported at batch 2 the view asks for ``[2, -1]``; lifted, it reads the batch from its
    tensor, as the program exported with a dynamic batch does."""
    model = ClassicHead().eval()
    x = torch.randn(2, 1, 8, 8)
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=64)}} if dynamic else None
    ep = torch.export.export(model, (x,), dynamic_shapes=shapes)
    gm = from_exported_program(ep)
    for batch in (1, 2, 5):
        other = torch.randn(batch, 1, 8, 8)
        torch.testing.assert_close(gm(other), model(other), rtol=0, atol=0)
    out = qcompile.PassManager(["canonicalize"]).run(qcompile.trace(gm, (x,)), (x,))
    targets = [n.target for n in out.graph.nodes if n.op == "call_function"]
    assert targets == [F.relu, F.max_pool2d, torch.flatten]


def test_a_view_of_another_size_keeps_its_sizes():
    class Regrouped(nn.Module):
        def forward(self, x):
            return x.view(4, -1)

    x = torch.randn(2, 8)
    _, gm = lifted(Regrouped(), x)
    assert not any(n.target == aten.sym_size.int for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), x.view(4, -1), rtol=0, atol=0)


def test_weights_that_are_not_module_parameters_stay_aten():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x):
            return F.conv2d(x, self.weight)

    x = torch.randn(1, 3, 6, 6)
    ep, gm = lifted(Functional(), x)
    torch.testing.assert_close(gm(x), ep.module()(x), rtol=0, atol=0)
    assert not called_modules(gm)
    assert any(n.target == aten.conv2d.default for n in gm.graph.nodes)


def test_decomposed_program_raises_convolution_and_native_batch_norm():
    model = _seeded(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8), nn.ReLU()))
    x = torch.randn(1, 4, 8, 8)
    ep = torch.export.export(model.eval(), (x,)).run_decompositions()
    gm = from_exported_program(ep)
    torch.testing.assert_close(gm(x), model(x))
    assert_layers_at_original_paths(model, gm)
    assert called_modules(gm) == {"0", "1"}


def test_builtin_passes_apply_to_lifted_programs():
    model = _seeded(torchvision.models.resnet18(weights=None)).eval()
    x = torch.randn(1, 3, 32, 32)
    _, gm = lifted(model, x)
    traced = qcompile.trace(gm, (x,))
    result = qcompile.PassManager(["canonicalize", "fold-bn"]).run(traced, example_inputs=(x,))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.modules())
    torch.testing.assert_close(result(x), model(x), rtol=1e-4, atol=1e-4)


def test_nested_inputs_are_refused():
    class TwoInputs(nn.Module):
        def forward(self, pair):
            return pair[0] + pair[1]

    ep = torch.export.export(TwoInputs(), ((torch.ones(2), torch.ones(2)),))
    with pytest.raises(ModelLoadError, match="positional tensors"):
        from_exported_program(ep)


@settings(max_examples=20, deadline=None)
@given(
    groups=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    bias=st.booleans(),
    one_d=st.booleans(),
)
def test_conv_hyperparameters_survive_lifting(groups, kernel, stride, padding, bias, one_d):
    conv_type = nn.Conv1d if one_d else nn.Conv2d
    conv = conv_type(4, 6, kernel, stride=stride, padding=padding, groups=groups, bias=bias)
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.randn((1, 4, 7) if one_d else (1, 4, 7, 7))
    ep, gm = lifted(model, x)
    torch.testing.assert_close(gm(x), ep.module()(x), rtol=0, atol=0)
    assert_layers_at_original_paths(model, gm)
