"""Model loading: every accepted form, and an actionable error for each way it can go wrong."""

import sys

import pytest
import torch
import torchvision
from torch import nn

from plugins.models import Branchy, SmallNet
from qcompile.errors import ConfigError, ModelLoadError
from qcompile.loading import IMAGENET_INPUT_SHAPE, load_model
from qcompile.models import SmallCNN
from qcompile.pipeline import available_passes
from qcompile.user_code import load_plugin, resolve_leaf

SMALL_ARCH = "plugins.models:SmallNet"
SMALL_INPUT = (1, 3, 16, 16)


def _trained_small_net() -> SmallNet:
    torch.manual_seed(1)
    model = SmallNet()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.fixture
def small(tmp_path):
    model = _trained_small_net()
    path = tmp_path / "small.pt"
    torch.save(model.state_dict(), path)
    return model, path


def _same_outputs(a: nn.Module, b: nn.Module, shape=SMALL_INPUT) -> None:
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_state_dict_with_class_arch(small):
    model, path = small
    loaded = load_model(path, arch=SMALL_ARCH)
    assert isinstance(loaded.module, SmallNet) and not loaded.module.training
    assert loaded.example_input_shape is None
    assert "small.pt" in loaded.description and SMALL_ARCH in loaded.description
    _same_outputs(model, loaded.module)


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_checkpoint_dict_is_unwrapped(tmp_path, key):
    model = _trained_small_net()
    path = tmp_path / "checkpoint.pth"
    torch.save({key: model.state_dict(), "epoch": 7, "best_top1": 71.5}, path)
    _same_outputs(model, load_model(path, arch=SMALL_ARCH).module)


def test_state_dict_with_torchvision_arch(tmp_path):
    model = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, arch="torchvision:resnet18")
    assert loaded.example_input_shape == IMAGENET_INPUT_SHAPE
    _same_outputs(model, loaded.module, (1, 3, 32, 32))


def test_torchvision_weights_of_another_class_count_load_with_that_count(tmp_path):
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path / "resnet18_mnist.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, arch="torchvision:resnet18")
    assert loaded.module.fc.out_features == 10 and "(10 classes)" in loaded.description
    _same_outputs(model, loaded.module, (1, 3, 32, 32))


def test_arch_keyword_arguments_build_the_model_the_weights_came_from(tmp_path):
    model = SmallCNN(classes=3, width=8).eval()
    path = tmp_path / "three.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model(path, arch="qcompile.models:SmallCNN")
    loaded = load_model(path, arch="qcompile.models:SmallCNN(classes=3, width=8)")
    _same_outputs(model, loaded.module, (1, 1, 12, 12))
    resnet = load_model(_saved(tmp_path, torchvision.models.resnet18(num_classes=7)),
                        arch="torchvision:resnet18(num_classes=7)")
    assert resnet.module.fc.out_features == 7


def _saved(tmp_path, model: nn.Module) -> str:
    path = tmp_path / f"{type(model).__name__}.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def test_other_shape_differences_from_torchvision_still_fail(tmp_path):
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # a grayscale stem: not resnet18's
    path = tmp_path / "resnet18_gray.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelLoadError, match="conv1.weight"):
        load_model(path, arch="torchvision:resnet18")


def test_key_mismatch_names_missing_and_unexpected_keys(small):
    _, path = small
    state = torch.load(path)
    state["extra.weight"] = state.pop("fc.weight")
    torch.save(state, path)
    with pytest.raises(ModelLoadError) as error:
        load_model(path, arch=SMALL_ARCH)
    assert "fc.weight" in str(error.value) and "extra.weight" in str(error.value)
    assert "missing" in str(error.value) and "unexpected" in str(error.value)


def test_shape_mismatch_is_a_load_error(tmp_path):
    path = tmp_path / "branchy.pt"
    torch.save({"conv.weight": torch.zeros(4, 3, 5, 5), "conv.bias": torch.zeros(4)}, path)
    with pytest.raises(ModelLoadError, match="conv.weight"):
        load_model(path, arch="plugins.models:Branchy")


def test_state_dict_without_arch_asks_for_it(small):
    with pytest.raises(ModelLoadError, match="--arch"):
        load_model(small[1])


def test_exported_program(tmp_path):
    model = _trained_small_net()
    path = tmp_path / "small.pt2"
    torch.save(model.state_dict(), tmp_path / "unused.pt")
    torch.export.save(torch.export.export(model, (torch.randn(SMALL_INPUT),)), path)
    loaded = load_model(path)
    assert isinstance(loaded.module, torch.fx.GraphModule)
    assert loaded.example_input_shape == SMALL_INPUT
    assert isinstance(dict(loaded.module.named_modules())["conv1"], nn.Conv2d)
    _same_outputs(model, loaded.module)
    with pytest.raises(ConfigError, match="--arch"):
        load_model(path, arch=SMALL_ARCH)


def test_pickled_module_needs_trust(tmp_path):
    model = _trained_small_net()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(ModelLoadError) as error:
        load_model(path)
    message = str(error.value)
    assert "--trust-pickle" in message and "runs code" in message
    assert "plugins.models.SmallNet" in message
    loaded = load_model(path, trust_pickle=True)
    assert isinstance(loaded.module, SmallNet)
    _same_outputs(model, loaded.module)


@pytest.mark.parametrize(
    "content, match",
    [(b"", "cannot read"), (b"definitely not a checkpoint", "cannot read")],
)
def test_unreadable_files(tmp_path, content, match):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=match):
        load_model(path, arch=SMALL_ARCH)


def test_file_holding_something_else(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ModelLoadError, match="not a model"):
        load_model(path, arch=SMALL_ARCH)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(ModelLoadError, match="not a file"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "arch, error_type, match",
    [
        ("torchvision:resnet19", ModelLoadError, "resnet18"),
        ("resnet18", ConfigError, "package.module:ClassName"),
        ("plugins.no_such_module:Net", ModelLoadError, "no module named 'plugins.no_such_module'"),
        ("plugins.models:NoSuchClass", ModelLoadError, "no attribute 'NoSuchClass'"),
        ("torch.nn:Conv2d", ModelLoadError, "no arguments"),
        ("collections:OrderedDict", ModelLoadError, "not an nn.Module"),
        ("qcompile.models:SmallCNN(3)", ConfigError, "keyword arguments with literal values"),
        ("qcompile.models:SmallCNN(classes=3", ConfigError, "keyword arguments"),
        ("qcompile.models:SmallCNN(classes=n)", ConfigError, "classes=n is not a literal"),
        ("qcompile.models:SmallCNN(clases=3)", ModelLoadError, "with clases=3: TypeError"),
        ("torchvision:resnet18(num_klasses=3)", ModelLoadError, "with num_klasses=3"),
    ],
)
def test_bad_arch(small, arch, error_type, match):
    with pytest.raises(error_type, match=match):
        load_model(small[1], arch=arch)


def test_plugin_from_file_registers_its_pass(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        "import qcompile\n"
        "@qcompile.register_pass('loading-test-noop')\n"
        "def noop(gm, ctx):\n"
        "    return gm\n"
    )
    module = load_plugin(str(plugin))
    assert "loading-test-noop" in available_passes()
    assert sys.modules[module.__name__] is module


def test_plugin_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_plugin(str(tmp_path / "absent.py"))
    with pytest.raises(ConfigError, match="no module named"):
        load_plugin("plugins.absent_plugin")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="RuntimeError: boom"):
        load_plugin(str(broken))


def test_resolve_leaf():
    model = torchvision.models.resnet18(weights=None)
    block = type(model.layer1[0])
    assert resolve_leaf(model, "layer1.0") == "layer1.0"
    assert resolve_leaf(model, "BasicBlock") is block
    assert resolve_leaf(model, f"{block.__module__}.{block.__qualname__}") is block
    assert resolve_leaf(Branchy(), "plugins.models:SmallNet") is SmallNet
    with pytest.raises(ConfigError, match="neither a module path"):
        resolve_leaf(model, "Bottleneck")
