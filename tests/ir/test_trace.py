import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import pytest

import qcompile
from qcompile.errors import InputError, TraceError
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


def test_example_inputs_may_be_one_tensor_or_numpy_arrays():
    """A bare tensor is the one input (not unpacked along its batch); a float64 NumPy array is a
    float32 tensor, as a float32 model takes."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 1, 4, 4)
    for example in (x, x.double().numpy(), [x.numpy()]):
        gm = qcompile.trace(model, example)
        last = [n for n in gm.graph.nodes if n.op == "call_module"][-1]
        assert output_shape(last) == (5, 3)


def test_example_inputs_the_model_does_not_run_on_say_where():
    model = torchvision.models.resnet18().eval()
    with pytest.raises(InputError, match=r"ResNet does not run on its example inputs "
                       r"\(1x1x64x64\) at 'conv1' \(Conv2d\): RuntimeError: Given groups=1"):
        qcompile.trace(model, (torch.randn(1, 1, 64, 64),))
    with pytest.raises(InputError, match=r"takes 1 input\(s\) \(x\); got 2 example inputs"):
        qcompile.trace(model, (torch.randn(1, 3, 64, 64),) * 2)

    class Scaled(nn.Module):
        def forward(self, x, scale: float = 2.0):
            return x * scale

    for example in ((torch.randn(2),), (torch.randn(2), torch.randn(2))):
        gm = qcompile.trace(Scaled(), example)
        assert output_shape([n for n in gm.graph.nodes if n.op == "output"][0].args[0]) == (2,)
    with pytest.raises(InputError, match=r"takes 1 to 2 input\(s\) \(x, scale\); got 0"):
        qcompile.trace(Scaled(), ())
