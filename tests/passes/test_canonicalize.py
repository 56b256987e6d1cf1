import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import qcompile


class ManySpellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.relu6 = nn.ReLU6()
        self.hardtanh = nn.Hardtanh(0.0, 6.0)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        a = self.relu(self.conv(x))
        b = torch.relu(a) + F.relu(a * 1, inplace=True)
        c = b.relu()
        c += torch.add(a, self.ident(b))
        d = self.relu6(c) + F.relu6(c) + F.hardtanh(c, 0.0, 6.0) + self.hardtanh(c)
        d = d.add(F.dropout(d, 0.1, training=False))
        e = self.fc(self.flat(self.drop(d)))
        return e + self.fc(d.flatten(1))


def run(model, x, training=False):
    model.train(training)
    gm = qcompile.trace(model, (x,))
    ctx = qcompile.PassContext()
    out = qcompile.PassManager(["canonicalize"]).run(gm, example_inputs=(x,), ctx=ctx)
    return out, ctx.records[0]


def call_targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def test_every_spelling_becomes_the_canonical_one():
    torch.manual_seed(0)
    model = ManySpellings()
    x = torch.randn(2, 3, 8, 8)
    expected = model.eval()(x)
    out, record = run(model, x)
    torch.testing.assert_close(out(x), expected)
    targets = call_targets(out)
    assert set(targets) <= {F.relu, F.relu6, operator.add, operator.mul, torch.flatten}
    assert targets.count(F.relu6) == 4 and targets.count(torch.flatten) == 2
    module_types = {type(m) for m in out.modules()} - {type(out)}
    assert module_types == {nn.Conv2d, nn.Linear}
    assert record.notes == ["removed 3 identity/dropout, rewrote 11 ops to canonical form"]


def test_shapes_are_propagated():
    x = torch.randn(2, 3, 8, 8)
    out, _ = run(ManySpellings(), x)
    fc = next(n for n in out.graph.nodes if n.target == "fc")
    assert tuple(fc.meta["tensor_meta"].shape) == (2, 3)


def test_dropout_is_kept_in_training_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.ReLU())
    out, record = run(model, torch.randn(2, 4), training=True)
    assert any(isinstance(m, nn.Dropout) for m in out.modules())
    assert any("dropout kept" in note for note in record.notes)
    assert F.relu in call_targets(out)


def test_in_place_op_whose_input_is_read_later_is_kept():
    class Aliased(nn.Module):
        def forward(self, x):
            y = x * 2
            z = y.relu_()
            return y + z

    x = torch.randn(5)
    out, record = run(Aliased(), x)
    assert "relu_" in call_targets(out)
    assert any("kept in-place" in note for note in record.notes)
    torch.testing.assert_close(out(x), Aliased()(x))


def test_resnet18_has_one_relu_spelling_and_same_output():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    out, _ = run(model, x)
    torch.testing.assert_close(out(x), model(x))
    assert not any(isinstance(m, nn.ReLU) for m in out.modules())
    assert call_targets(out).count(F.relu) == 17


FLATTENING_VIEWS = {
    "view(size(0), -1)": (lambda x: x.view(x.size(0), -1), (1, -1)),
    "view(size()[0], -1)": (lambda x: x.view(x.size()[0], -1), (1, -1)),
    "reshape(-1, C*H*W)": (lambda x: x.reshape(-1, 4 * 3 * 5), (1, -1)),
    "torch.reshape(shape[0], -1)": (lambda x: torch.reshape(x, (x.shape[0], -1)), (1, -1)),
    "view(size(0), C, -1)": (lambda x: x.view(x.size(0), 4, -1), (2, -1)),
    "view((-1, C*H, W))": (lambda x: x.view((-1, 4 * 3, 5)), (1, 2)),
}


class Viewed(nn.Module):
    def __init__(self, view):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.view = view

    def forward(self, x):
        return self.view(self.conv(x)) * 2


@pytest.mark.parametrize("name", FLATTENING_VIEWS)
def test_a_view_that_flattens_becomes_flatten_for_every_batch_size(name):
    """The sizes it read go with it, and the graph runs at other batch sizes, as the view did."""
    view, dims = FLATTENING_VIEWS[name]
    model = Viewed(view).eval()
    out, _ = run(model, torch.randn(3, 2, 3, 5))
    flattens = [n for n in out.graph.nodes if n.target is torch.flatten]
    assert [tuple(n.args[1:]) for n in flattens] == [dims]
    assert call_targets(out) == [torch.flatten, operator.mul]
    for batch in (1, 3, 7):
        x = torch.randn(batch, 2, 3, 5)
        torch.testing.assert_close(out(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("view", [
    lambda x: x.view(3, -1),  # a fixed batch
    lambda x: x.reshape(x.size(0), 2, 2, 15),  # splits a dimension
    lambda x: x.view(x.size(0), 3, 4, 5),  # the same number of elements, moved
    lambda x: x.view(-1, 5),  # merges the batch too
])
def test_views_that_are_not_a_flatten_stay(view):
    model = Viewed(view).eval()
    x = torch.randn(3, 2, 3, 5)
    out, _ = run(model, x)
    assert torch.flatten not in call_targets(out)
    torch.testing.assert_close(out(x), model(x), rtol=0, atol=0)


SPATIAL_MEANS = {
    "x.mean((2, 3))": (lambda x: x.mean((2, 3)), [F.adaptive_avg_pool2d, torch.flatten]),
    "torch.mean(x, [-2, -1], keepdim=True)": (
        lambda x: torch.mean(x, [-2, -1], keepdim=True), [F.adaptive_avg_pool2d]),
    "x.mean(dim=(3, 2))": (lambda x: x.mean(dim=(3, 2)), [F.adaptive_avg_pool2d, torch.flatten]),
    "1-d: x.flatten(2).mean(-1)": (lambda x: x.flatten(2).mean(-1),
                                   [torch.flatten, F.adaptive_avg_pool1d, torch.flatten]),
}


@pytest.mark.parametrize("name", SPATIAL_MEANS)
def test_a_mean_over_the_spatial_dimensions_becomes_adaptive_pooling(name):
    view, targets = SPATIAL_MEANS[name]
    model = Viewed(view).eval()
    x = torch.randn(3, 2, 3, 5)
    out, record = run(model, x)
    assert call_targets(out) == [*targets, operator.mul]
    torch.testing.assert_close(out(x), model(x))
    rewritten = 1 + ("flatten(2)" in name)  # and x.flatten(2) to torch.flatten
    assert record.notes == [
        f"removed 0 identity/dropout, rewrote {rewritten} ops to canonical form"]


@pytest.mark.parametrize("mean", [
    lambda x: x.mean((1, 2, 3)),  # the channels too
    lambda x: x.mean(3),  # one of two spatial dimensions
    lambda x: x.mean((2, 3), dtype=torch.float64),
])
def test_other_means_stay(mean):
    model = Viewed(mean).eval()
    x = torch.randn(3, 2, 3, 5)
    out, _ = run(model, x)
    assert not {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d} & set(call_targets(out))
    torch.testing.assert_close(out(x), model(x))
