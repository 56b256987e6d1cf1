
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qcompile
from qcompile.errors import ConfigError
from qcompile.models import SmallCNN
from qcompile.quant import Quantizer, make_quantizer
from qcompile.quant.layers import quantizable_layers
from qcompile.quant.qn import fix_thresholds
from qcompile.quant.requantize import recalibrate, requantize
from real_data import digits, digits_calibration as calib

LAYERS = ["features.0.0", "features.1.0", "features.2.0", "classifier"]




def quantized(method="lsq", bits=2, seed=0, model=None):
    torch.manual_seed(seed)
    x = digits().train_x[:8]
    return qcompile.quantize((model or SmallCNN()).eval(), (x,), bits=bits, method=method,
                             calib_data=calib())


def input_node(gm, layer):
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer).args[0]


def input_quantizer(gm, layer):
    return gm.get_submodule(input_node(gm, layer).target)


def float_state(gm):
    """Every tensor of the model that is not a quantizer's: weights, biases, BN statistics."""
    quantizers = [name for name, m in gm.named_modules() if isinstance(m, Quantizer)]
    return {k: v.clone() for k, v in gm.state_dict().items()
            if not any(k.startswith(q + ".") for q in quantizers)}


def layer_inputs(gm, batches):
    """Each layer's input with every input quantizer bypassed, seen by hooks on the layers."""
    seen = {}
    hooks = [gm.get_submodule(name).register_forward_pre_hook(
        lambda m, args, name=name: seen.setdefault(name, []).append(args[0].detach()))
        for name in LAYERS]
    flags = {m: m.enabled for m in gm.input_quantizers.children()}
    for module in flags:
        module.enabled = False
    gm.eval()
    with torch.no_grad():
        for batch in batches:
            gm(*batch)
    for module, flag in flags.items():
        module.enabled = flag
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(values) for name, values in seen.items()}


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("method", ["lsq", "qn", "dq"])
def test_new_quantizers_start_from_current_weights_and_calibration(method):
    gm = quantized(method)
    with torch.no_grad():
        gm.get_submodule("features.1.0").layer.weight.mul_(1.7)  # as if trained since quantization
    before = float_state(gm)
    first, last = gm.get_submodule("features.0.0").weight_quantizer, gm.classifier.weight_quantizer
    changed = requantize(gm, {"features.1.0": 4, "features.2.0": 4}, calib())
    assert changed == ["features.1.0", "features.2.0"]
    after = float_state(gm)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert gm.get_submodule("features.0.0").weight_quantizer is first
    assert gm.classifier.weight_quantizer is last
    inputs = layer_inputs(gm, calib())
    for name in ("features.1.0", "features.2.0"):
        site = next(s for s in quantizable_layers(gm) if s.name == name)
        assert site.node.meta["quant"]["weight_bits"] == site.node.meta["quant"]["act_bits"] == 4
        expected = make_quantizer(method, "weight", 4, signed=True, per_channel=True,
                                  channels=site.weight.shape[0])
        expected.initialize(site.weight.detach())
        assert_same_state(site.module.weight_quantizer, expected)
        expected = make_quantizer(method, "activation", 4, signed=False)
        expected.initialize(inputs[name])
        assert_same_state(input_quantizer(gm, name), expected)
        assert input_node(gm, name).meta["quant_input"]["bits"] == 4
    assert torch.isfinite(gm(digits().train_x[:16])).all()


def test_unchanged_bits_change_nothing():
    gm = quantized()
    modules = dict(gm.named_modules())
    assert requantize(gm, {"features.1.0": 2}, calib()) == []
    assert requantize(gm, lambda name: None, calib()) == []
    assert all(modules[name] is module for name, module in gm.named_modules())


def test_flags_and_temperature_carry_over():
    gm = quantized("qn")
    old = input_quantizer(gm, "features.1.0")
    old.enabled = False
    old.set_temperature(37.0)
    gm.get_submodule("features.1.0").weight_quantizer.set_hard(True)
    requantize(gm, {"features.1.0": 3}, calib())
    new = input_quantizer(gm, "features.1.0")
    assert new is not old and new.bits == 3
    assert new.enabled is False and float(new.temperature) == 37.0
    assert gm.get_submodule("features.1.0").weight_quantizer.hard is True


def test_fixed_qn_thresholds_stay_fixed_in_new_quantizers():
    gm = quantized("qn")
    assert fix_thresholds(gm) > 0
    requantize(gm, {"features.1.0": 3}, calib())
    new = [input_quantizer(gm, "features.1.0"),
           gm.get_submodule("features.1.0").weight_quantizer]
    assert all(q.bits == 3 and not q.thresholds_learned and not q.biases.requires_grad
               for q in new)


def test_without_calibration_builds_a_structure_a_saved_state_loads_into():
    trained = quantized("qn")
    requantize(trained, {"features.1.0": 4, "features.2.0": 3}, calib())
    fresh = quantized("qn")
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(trained.state_dict())  # QN's thresholds depend on the bits
    fresh = quantized("qn")
    requantize(fresh, {"features.1.0": 4, "features.2.0": 3}, calib_data=None)
    fresh.load_state_dict(trained.state_dict())
    x = digits().test_x[:16]
    torch.testing.assert_close(fresh.eval()(x), trained.eval()(x), rtol=0, atol=0)


class TwoBranches(nn.Module):
    """Two convolutions read one tensor, as a residual block's conv and downsample do."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.left = nn.Conv2d(4, 4, 3, padding=1)
        self.right = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(torch.flatten(self.left(x) + self.right(x), 1))


def input_groups(gm):
    return sorted((n.meta["quant_input"]["bits"], tuple(n.meta["quant_input"]["layers"]))
                  for n in gm.graph.nodes
                  if n.op == "call_module" and n.target.startswith("input_quantizers."))


def test_layers_reading_one_tensor_split_and_merge_by_bits():
    gm = quantized(model=TwoBranches())
    assert input_groups(gm) == [(2, ("left", "right")), (8, ("head",)), (8, ("stem",))]
    x = digits().train_x[:4]
    requantize(gm, {"left": 4}, calib())
    assert input_groups(gm) == [(2, ("right",)), (4, ("left",)), (8, ("head",)), (8, ("stem",))]
    assert input_node(gm, "left").args[0] is input_node(gm, "right").args[0]
    assert gm(x).shape == (4, 10)
    requantize(gm, {"right": 4}, calib())
    assert input_groups(gm) == [(4, ("left", "right")), (8, ("head",)), (8, ("stem",))]
    assert input_quantizer(gm, "left") is input_quantizer(gm, "right")
    used = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    held = {f"input_quantizers.{name}" for name, _ in gm.input_quantizers.named_children()}
    assert held <= used
    gm.graph.lint()
    assert gm(x).shape == (4, 10)


class TwoHeads(nn.Module):
    """A middle layer (``aux``) and the last layer (``head``) reading one tensor."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.aux = nn.Linear(4 * 8 * 8, 10)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        features = torch.flatten(torch.relu(self.stem(x)), 1)
        return self.aux(features) + self.head(features)


def test_layers_of_different_methods_keep_their_own_input_quantizers():
    """As ``insert-quantizers`` shares an input quantizer per (tensor, bits, method), so does
    requantize: the middle layer brought to the last layer's 8 bits keeps its QIL input."""
    torch.manual_seed(0)
    x = digits().train_x[:8]
    gm = qcompile.quantize(TwoHeads().eval(), (x,), bits=2, method="qil",
                           first_last_method="lsq", calib_data=calib())
    assert input_quantizer(gm, "aux").method == "qil"
    assert input_quantizer(gm, "head").method == "lsq"
    requantize(gm, {"aux": 8}, calib())
    assert input_groups(gm) == [(8, ("aux",)), (8, ("head",)), (8, ("stem",))]
    assert input_quantizer(gm, "aux").method == "qil"
    assert input_quantizer(gm, "head").method == "lsq"
    assert input_node(gm, "aux").meta["quant_input"]["method"] == "qil"
    requantize(gm, {"aux": 2}, calib())
    assert input_groups(gm) == [(2, ("aux",)), (8, ("head",)), (8, ("stem",))]
    gm.graph.lint()
    assert gm(x[:4]).shape == (4, 10)


def test_an_input_quantizer_that_fell_back_to_lsq_is_kept():
    """DoReFa has no signed activations: the model input's quantizer is LSQ under a DoReFa layer.
    Changing another layer's bits leaves it, the same module, in place."""
    gm = quantized(method="dorefa")
    first = input_quantizer(gm, "features.0.0")
    assert first.method == "lsq" and gm.get_submodule("features.0.0").weight_quantizer.method \
        == "dorefa"
    requantize(gm, {"features.1.0": 4}, calib())
    assert input_quantizer(gm, "features.0.0") is first
    assert input_quantizer(gm, "features.1.0").method == "dorefa"


def test_recalibrate_sets_ranges_from_current_activations():
    gm = quantized()
    with torch.no_grad():
        gm.get_submodule("features.0.0").layer.weight.mul_(3.0)
    quantizer = input_quantizer(gm, "features.1.0")
    stale = quantizer.step.clone()
    recalibrate(gm, calib())
    expected = make_quantizer("lsq", "activation", 2, signed=False)
    expected.initialize(layer_inputs(gm, calib())["features.1.0"])
    assert_same_state(quantizer, expected)
    assert not torch.equal(quantizer.step, stale)


def test_user_errors_say_what_to_do():
    gm = quantized()
    with pytest.raises(ConfigError, match="no quantized layers"):
        requantize(gm, {"features.9": 4}, calib())
    with pytest.raises(ConfigError, match="1-8"):
        requantize(gm, {"features.1.0": 9}, calib())
    with pytest.raises(ConfigError, match="calib_data"):
        requantize(gm, {"features.1.0": 4}, [])


@settings(max_examples=25, deadline=None)
@given(bits=st.lists(st.integers(1, 8), min_size=4, max_size=4),
       method=st.sampled_from(["lsq", "qil", "qn", "pact"]))
def test_any_bits_assignment_is_applied_exactly(bits, method):
    gm = quantized(method)
    before = float_state(gm)
    requantize(gm, dict(zip(LAYERS, bits)), calib())
    for site, width in zip(quantizable_layers(gm), bits):
        assert site.node.meta["quant"]["weight_bits"] == width
        assert site.module.weight_quantizer.bits == width
        assert input_quantizer(gm, site.name).bits == width
    after = float_state(gm)
    assert all(torch.equal(before[k], after[k]) for k in before)
    gm.graph.lint()
    assert torch.isfinite(gm(digits().train_x[:8])).all()
