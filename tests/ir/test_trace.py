import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import pytest

import qcompile
from qcompile.errors import TraceError
from qcompile.ir import QcompileTracer, output_shape


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            return y
        return -y


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.inner(x).mean(dim=(2, 3)))


class Looping(nn.Module):
    def forward(self, x):
        return sum(row for row in x)


def test_trace_keeps_quantizable_layers_as_leaves_and_records_shapes():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    gm = qcompile.trace(model, (x,))
    modules = dict(gm.named_modules())
    convs = [n for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)]
    assert len(convs) == 20
    assert output_shape(convs[0]) == (1, 64, 32, 32)
    torch.testing.assert_close(gm(x), model(x))


def test_trace_copies_the_model():
    model = nn.Sequential(nn.Linear(4, 4))
    gm = qcompile.trace(model)
    with torch.no_grad():
        gm.get_submodule("0").weight.zero_()
    assert model[0].weight.abs().sum() > 0


def test_data_dependent_branch_names_module_and_line():
    with pytest.raises(TraceError) as info:
        qcompile.trace(Holder(), (torch.randn(1, 3, 8, 8),))
    message = str(info.value)
    assert "'inner'" in message
    assert "test_trace.py" in message and "if y.sum() > 0:" in message
    assert "leaf" in message and "concrete_args" in message


def test_branch_at_top_level_names_the_model():
    with pytest.raises(TraceError, match="forward of Branchy.*if y.sum"):
        qcompile.trace(Branchy())


def test_iterating_a_proxy_is_a_trace_error():
    with pytest.raises(TraceError, match="sum\\(row for row in x\\)"):
        qcompile.trace(Looping())


def test_user_leaf_module_makes_untraceable_module_traceable():
    gm = qcompile.trace(Holder(), (torch.randn(1, 3, 8, 8),), leaf_modules=[Branchy])
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["inner", "fc"]
    gm_by_path = qcompile.trace(Holder(), leaf_modules=["inner"])
    assert [n.target for n in gm_by_path.graph.nodes if n.op == "call_module"] == ["inner", "fc"]


def test_concrete_args_fix_the_branch():
    class Scaled(nn.Module):
        def forward(self, x, double: bool):
            return x * 2 if double else F.relu(x)

    gm = qcompile.trace(Scaled(), concrete_args={"double": True})
    x = torch.randn(3)
    torch.testing.assert_close(gm(x, True), x * 2)
    assert not any(n.target is F.relu for n in gm.graph.nodes)


def test_tracer_leaf_types_include_registered_types():
    class Custom(nn.Module):
        def forward(self, x):
            return x

    assert not QcompileTracer().is_leaf_module(Custom(), "c")
    assert QcompileTracer([Custom]).is_leaf_module(Custom(), "c")
    assert QcompileTracer().is_leaf_module(nn.Conv1d(1, 1, 1), "c")


def test_trace_rejects_non_modules():
    with pytest.raises(TraceError, match="needs an nn.Module"):
        qcompile.trace(lambda x: x)
