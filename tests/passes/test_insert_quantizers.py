import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qcompile
from batch_norms import with_batch_statistics
from qcompile.errors import ConfigError
from qcompile.fused import ConvBatchNorm
from qcompile.models import SmallCNN
from qcompile.quant import Quantizer, available_methods, get_method
from qcompile.quant.layers import quantizable_layers
from qcompile.quant.quantized_layer import QuantizedLayer

PIPELINE = ["canonicalize", "fold-bn{mode=qat}", "assign-bits", "insert-quantizers"]


def quantized(model, x, ctx=None, passes=PIPELINE, **config):
    config.setdefault("calib_data", [(x,)])
    return qcompile.quantize(model.eval(), (x,), passes=passes, ctx=ctx, **config)




def input_quantizer_nodes(gm):
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Quantizer)]


@pytest.mark.parametrize("method", available_methods())
def test_every_layer_gets_weight_and_input_quantizers(method):
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28)
    gm = quantized(SmallCNN(), x, method=method, bits=2)
    sites = quantizable_layers(gm)
    assert len(sites) == 4
    edge = get_method(method).wide_edges or method  # the 8-bit first and last layers
    for site, expected in zip(sites, [edge, method, method, edge], strict=True):
        assert isinstance(site.module, (QuantizedLayer, ConvBatchNorm))
        assert isinstance(site.module.weight_quantizer, Quantizer)
        assert site.module.weight_quantizer.method == expected
        source = site.node.args[0]
        assert source.op == "call_module" and isinstance(gm.get_submodule(source.target), Quantizer)
    widths = [(s.node.meta["quant"]["weight_bits"], s.node.meta["quant"]["act_bits"]) for s in sites]
    assert widths == [(8, 8), (2, 2), (2, 2), (8, 8)]
    assert [s.module.weight_quantizer.bits for s in sites] == [8, 2, 2, 8]
    out = gm(x)
    assert out.shape == (16, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("method", available_methods())
def test_eight_bit_model_stays_close_to_float(method):
    """A sane initialisation: at W8A8 the quantized small CNN computes nearly the float function."""
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.randn(32, 1, 28, 28)
    gm = quantized(model, x, method=method, bits=8)
    for module in gm.modules():
        if isinstance(module, Quantizer):
            module.set_hard(True)
    gm.eval()
    with torch.no_grad():
        error = (gm(x) - model(x)).norm() / model(x).norm()
    assert error < 0.05


@pytest.mark.parametrize("method", ["qn", "qil"])
def test_first_and_last_layers_can_take_another_method(method):
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28)
    ctx = qcompile.PassContext()
    gm = quantized(SmallCNN(), x, ctx=ctx, method=method, bits=2, first_last_method="lsq")
    assert f"{method}: 4 layers (first and last: lsq)" in ctx.records[-1].notes[-1]
    sites = quantizable_layers(gm)
    assert [s.module.weight_quantizer.method for s in sites] == ["lsq", method, method, "lsq"]
    inputs = [gm.get_submodule(s.node.args[0].target) for s in sites]
    assert [q.method for q in inputs] == ["lsq", method, method, "lsq"]
    assert [q.bits for q in inputs] == [8, 2, 2, 8]
    assert torch.isfinite(gm(x)).all()


@pytest.mark.parametrize(("config", "edges", "note"), [
    ({}, ["lsq", "lsq"], "qn: 4 layers (first and last: lsq)"),
    ({"first_last_method": "qn"}, ["qn", "qn"], "qn: 4 layers, "),
    ({"first_last_bits": 4}, ["qn", "qn"], "qn: 4 layers, "),
    ({"first_last_bits": 6}, ["lsq", "lsq"], "qn: 4 layers (first and last: lsq)"),
])
def test_qn_first_and_last_layers_take_lsq_when_wider_than_four_bits(config, edges, note):
    """QN names LSQ for its wide first and last layers; ``first_last_method`` overrides it, and
    first and last layers of 4 bits or fewer stay QN."""
    assert get_method("qn").wide_edges == "lsq" and get_method("qil").wide_edges is None
    x = torch.randn(16, 1, 28, 28)
    ctx = qcompile.PassContext()
    gm = quantized(SmallCNN(), x, ctx=ctx, method="qn", bits=2, **config)
    assert ctx.records[-1].notes[-1].startswith(note)
    sites = quantizable_layers(gm)
    inputs = [gm.get_submodule(s.node.args[0].target) for s in sites]
    for quantizers in ([s.module.weight_quantizer for s in sites], inputs):
        assert [q.method for q in quantizers] == [edges[0], "qn", "qn", edges[1]]


def test_only_a_wide_edge_takes_the_wide_method():
    """Bits per layer (as a budget assigns them): the 8-bit first layer takes LSQ, the 3-bit
    last layer stays QN, and the note names each."""
    x = torch.randn(16, 1, 28, 28)
    gm = qcompile.trace(SmallCNN(), (x,))
    gm = qcompile.PassManager(["canonicalize", "fold-bn"]).run(gm, (x,))
    sites = quantizable_layers(gm)
    for site, bits in zip(sites, [8, 2, 2, 3], strict=True):
        site.node.meta["quant"] = {"weight_bits": bits, "act_bits": bits}
    ctx = qcompile.PassContext()
    gm = qcompile.PassManager(["insert-quantizers"]).run(gm, (x,), ctx=ctx, method="qn")
    assert "qn: 4 layers (first: lsq, last: qn)" in ctx.records[-1].notes[-1]
    assert [s.module.weight_quantizer.method for s in quantizable_layers(gm)] == [
        "lsq", "qn", "qn", "qn"]


def test_unknown_first_last_method_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown quantization method .lqs."):
        quantized(SmallCNN(), torch.randn(2, 1, 28, 28), method="qn", first_last_method="lqs")


def test_input_quantizer_is_shared_by_layers_reading_one_tensor():
    x = torch.randn(2, 3, 32, 32)
    gm = quantized(torchvision.models.resnet18(), x, method="lsq", bits=4)
    nodes = input_quantizer_nodes(gm)
    layers = [n.meta["quant_input"]["layers"] for n in nodes]
    assert ["layer2.0.conv1", "layer2.0.downsample.0"] in layers
    assert len(nodes) == 21 - 3  # three downsample convs share their block's input quantizer


def test_signed_inputs_get_signed_quantizers_and_unsigned_after_relu():
    x = torch.randn(8, 1, 28, 28)
    gm = quantized(SmallCNN(), x, method="lsq", bits=4)
    signs = [n.meta["quant_input"]["signed"] for n in input_quantizer_nodes(gm)]
    assert signs == [True, False, False, False]


def test_method_without_signed_activations_falls_back_and_says_so():
    x = torch.randn(8, 1, 28, 28)
    ctx = qcompile.PassContext()
    gm = quantized(SmallCNN(), x, ctx=ctx, method="pact", bits=4)
    first = input_quantizer_nodes(gm)[0]
    methods = [gm.get_submodule(n.target).method for n in input_quantizer_nodes(gm)]
    if methods[0] == "lsq":
        assert any("LSQ quantizes this input" in note for note in ctx.records[-1].notes)
    assert first.meta["quant_input"]["signed"]
    assert set(methods[1:]) == {"pact"}


def test_activation_ranges_come_from_calibration_data():
    model = SmallCNN()
    small = quantized(model, torch.randn(8, 1, 28, 28), method="lsq", bits=4)
    large = quantized(model, 100 * torch.randn(8, 1, 28, 28), method="lsq", bits=4)
    step = lambda gm: gm.get_submodule(input_quantizer_nodes(gm)[0].target).step  # noqa: E731
    assert (step(large) > 50 * step(small)).all()


def test_calibration_data_comes_in_the_forms_users_hold_it():
    """A loader's (inputs, labels) batches, one tensor or NumPy array, a Dataset, a generator:
    each calibrates as the list of input tuples of the same examples does. A shuffling loader
    and a generator are read once, for every pass that calibrates (input quantizers, then
    boundaries), and only as far as the passes go."""
    torch.manual_seed(0)
    x, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    model = SmallCNN().eval()
    steps = lambda gm: [m.step for m in gm.modules() if isinstance(m, Quantizer)  # noqa: E731
                        and hasattr(m, "step") and m.step.numel() == 1]
    expected = steps(qcompile.quantize(model, (x[:1],), method="lsq", bits=4,
                                       calib_data=[(x,)]))
    pairs = TensorDataset(x, labels)
    forms = {"loader of (inputs, labels)": DataLoader(pairs, batch_size=16),
             "tensor": x, "float64 array": x.double().numpy(), "dataset": pairs,
             "generator": ((x[i:i + 16],) for i in range(0, 64, 16))}
    for form, data in forms.items():
        got = steps(qcompile.quantize(model, (x[:1],), method="lsq", bits=4, calib_data=data))
        assert len(got) == len(expected) > 1, form
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, msg=form)
    drawn = []
    shuffled = DataLoader(TensorDataset(torch.randn(4096, 1, 28, 28)), batch_size=16,
                          shuffle=True)
    reading = ((drawn.append(batch) or batch) for batch in shuffled)
    qcompile.quantize(model, (x[:1],), method="lsq", bits=4, calib_data=reading)
    assert len(drawn) == 4  # 64 examples of 4096, the same ones for both passes


def test_calibration_batches_that_are_not_model_inputs_are_config_errors():
    x = torch.randn(8, 1, 28, 28)
    with pytest.raises(ConfigError, match=r"tuples of model input tensors .* got \(str\)"):
        qcompile.quantize(SmallCNN().eval(), (x[:1],), bits=4, calib_data=[("images",)])
    with pytest.raises(ConfigError, match=r"got \(a tensor of shape \(\)\)"):
        qcompile.quantize(SmallCNN().eval(), (x[:1],), bits=4, calib_data=[torch.tensor(1.0)])


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("method", available_methods())
def test_torchvision_models_quantize_and_train(arch, method):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)  # at 32x32 mobilenet's last blocks see 1x1 maps
    model = with_batch_statistics(torchvision.models.get_model(arch, weights=None), x)
    gm = quantized(model, x, method=method, bits=2)
    sites = quantizable_layers(gm)
    bits = [s.node.meta["quant"]["weight_bits"] for s in sites]
    assert bits[0] == bits[-1] == 8 and set(bits[1:-1]) == {2}
    gm.train()
    gm(x).square().mean().backward()
    quantizer_params = [p for m in gm.modules() if isinstance(m, Quantizer) for p in m.parameters()]
    assert quantizer_params and any(p.grad is not None and p.grad.abs().sum() > 0
                                    for p in quantizer_params)


def test_report_shows_method_and_bits():
    from qcompile.report import format_table, layer_report

    gm = quantized(SmallCNN(), torch.randn(4, 1, 28, 28), method="lsq", bits=3)
    rows = layer_report(gm)
    assert [(r.method, r.weight_bits) for r in rows] == [("lsq", 8), ("lsq", 3), ("lsq", 3),
                                                         ("lsq", 8)]
    assert "lsq" in format_table(rows)


def test_eval_mode_folding_pipeline_also_quantizes():
    x = torch.randn(4, 1, 28, 28)
    gm = quantized(SmallCNN(), x, method="lsq", bits=4,
                   passes=["canonicalize", "fold-bn", "assign-bits", "insert-quantizers"])
    assert all(isinstance(s.module, QuantizedLayer) for s in quantizable_layers(gm))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
