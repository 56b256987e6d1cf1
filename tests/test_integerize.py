"""integerize + the reference backend against the simulated model, layer by layer.

Every method at W2A2, W4A4 and W8A8 (first and last layer 8-bit) on the small CNN, torchvision's
resnet18 and mobilenet_v2 (random weights, randomized batch-norm statistics, calibrated
quantizers), and the small CNN after a short QAT on mnist5k: the integer activations equal the
simulated model's on >= 99.99% of elements per layer, differ by at most 1 LSB and only at
rounding ties, and the output argmax agrees everywhere.
"""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from quantized_models import images, quantized
from qcompile import integer_ir as ir
from qcompile.data import load_builtin
from qcompile.errors import IntegerizeError
from qcompile.ir.export_frontend import from_exported_program
from qcompile.models import SmallCNN
from qcompile.quant import Quantizer, available_methods

METHODS = available_methods()
BITS = [2, 4, 8]


def assert_faithful(qm, x, dtype=torch.float64, min_match=0.9999):
    """In float64 (the precision integerize takes the model at) every difference must be a
    rounding tie of an activation, at most 1 LSB; in float32 the model's own roundings (of a
    weight on a rounding tie, of a scale) can decide a tie the other way, so only the number of
    differences is bounded, and their size where they start: a code that differs by one step
    moves the next layers' inputs by more than rounding, so their codes can differ by more."""
    integer_graph = qcompile.integerize(qm)
    report = qcompile.verify(qm, integer_graph, x, dtype=dtype)
    assert report.layers, "no integer activations compared"
    if dtype == torch.float64:
        assert report.unexplained == 0, report.format()
        assert report.max_lsb <= 1, report.format()
    first = next((layer for layer in report.layers if layer.matched < layer.elements), None)
    assert first is None or first.max_lsb <= 1, report.format()
    assert report.min_match_fraction >= min_match, report.format()
    assert report.argmax_agreement == 1.0, report.format()
    return integer_graph, report


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", METHODS)
def test_small_cnn_integer_activations_equal_the_simulated_ones(method, bits):
    qm, x = quantized("small", method, bits)
    integer_graph, _ = assert_faithful(qm, x)
    # float32, as the model trains: differences stay rare and at most 1 LSB
    assert_faithful(qm, x, dtype=torch.float32, min_match=0.999)
    layers = integer_graph.layers()
    assert [op.weight.bits for op in layers] == [8, bits, bits, 8]
    assert all(op.weight.integers.dtype == torch.int64 for op in layers)


@pytest.mark.parametrize(("arch", "method", "bits"), [
    ("resnet18", "qil", 2), ("mobilenet_v2", "lsq", 4)])
def test_torchvision_models_integer_activations_equal_the_simulated_ones(arch, method, bits):
    qm, x = quantized(arch, method, bits)
    assert_faithful(qm, x)


@pytest.mark.parametrize("arch", ["small", "resnet18", "mobilenet_v2"])
def test_exported_programs_integerize_as_their_modules_do(arch):
    """torch.export spells pooling, flatten and concatenation as ATen ops (``aten.max_pool2d``,
    ``aten.flatten.using_ints``); read from a program, the model still has an integer program,
    the one its module has."""
    qm, x = quantized(arch, "lsq", 4, exported=True)
    integer_graph, _ = assert_faithful(qm, x)
    reference = qcompile.integerize(quantized(arch, "lsq", 4)[0])
    assert [type(op) for op in integer_graph.ops] == [type(op) for op in reference.ops]


class ViewedLeNet(nn.Module):
    """Flattens with ``x.view(x.size(0), -1)``, as much hand-written model code does."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.view(x.size(0), -1))


class MeanPooledLeNet(ViewedLeNet):
    """Pools globally with ``x.mean((2, 3))``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


@pytest.mark.parametrize("exported", [False, True])
@pytest.mark.parametrize(("model_type", "op_type"), [(ViewedLeNet, ir.Reshape),
                                                     (MeanPooledLeNet, ir.SumPool)])
def test_models_that_flatten_with_view_or_pool_with_mean_have_an_integer_program(
        model_type, op_type, exported):
    torch.manual_seed(0)
    model, x = model_type().eval(), images("small")
    if exported:  # at batch 1, which the program then fixes in its view
        model = from_exported_program(torch.export.export(model, (x[:1],)))
    qm = qcompile.quantize(model, (x[:1],), bits=2, method="lsq", calib_data=[(x,)])
    integer_graph, _ = assert_faithful(qm, x)
    assert sum(isinstance(op, op_type) for op in integer_graph.ops) == 1


@pytest.mark.slow
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_every_method_on_torchvision_models(arch, method, bits):
    qm, x = quantized(arch, method, bits)
    assert_faithful(qm, x)


@pytest.mark.parametrize("method", ["lsq", "qil"])
def test_small_cnn_after_qat_on_mnist5k(method):
    data = load_builtin("mnist5k")
    torch.manual_seed(0)
    qm = qcompile.quantize(SmallCNN(1, 10, width=8), (data.train_x[:1],), bits=2, method=method,
                           calib_data=[(data.train_x[:128],)])
    history = qcompile.train(qm, (data.train_x[:1024], data.train_y[:1024]),
                             (data.test_x[:256], data.test_y[:256]), epochs=1, lr=3e-3,
                             batch_size=64, progress=False)
    assert history.final_val_accuracy > history.initial_val_accuracy
    _, report = assert_faithful(qm, data.test_x[:256])
    assert report.argmax_agreement == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("lsq", "qil")])
def test_small_cnn_after_qat_every_other_method(method):
    test_small_cnn_after_qat_on_mnist5k(method)


def test_integer_layers_hold_only_integers_and_match_float_layers():
    """The accumulator times its scale plus bias is the simulated layer's float output (in
    float64, the precision integerize takes the model at: in float32 a rounding tie decided the
    other way upstream changes a layer's input)."""
    qm, x = quantized("small", "lsq", 4)
    integer_graph = qcompile.integerize(qm)
    qm, x = qm.double(), x.double()
    values = integer_graph.integer_activations(x)
    simulated = {}
    hooks = [qm.get_submodule(op.layer).register_forward_hook(
        lambda m, a, out, name=op.name: simulated.__setitem__(name, out))
        for op in integer_graph.layers()]
    with torch.no_grad():
        for q in qm.modules():
            if isinstance(q, Quantizer):
                q.set_hard(True)
        qm.eval()(x)
    for hook in hooks:
        hook.remove()
    for op in integer_graph.layers():
        v = values[op.name]
        assert v.dtype == torch.int64 and int(v.abs().max()) <= integer_graph.values[op.name].bound
        acc = integer_graph.values[op.name]
        shape = [1, -1] + [1] * (v.dim() - 2)
        y = v.double() * acc.scale.reshape(shape) + acc.bias.reshape(shape)
        torch.testing.assert_close(y, simulated[op.name], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("method", "bits"), [("lsq", 4), ("qil", 2), ("qn", 2)])
def test_requantization_uses_fixed_point_where_exact(method, bits):
    """Quantizers that state their thresholds (QIL, QN) get the fixed-point form too where
    their staircase is a line: every one of them here, freshly calibrated."""
    qm, x = quantized("small", method, bits)
    integer_graph = qcompile.integerize(qm)
    requantize = [op for op in integer_graph.ops if isinstance(op, ir.Requantize)]
    fixed = [op for op in requantize if op.fixed_point is not None]
    assert fixed == requantize, "a uniform staircase found no fixed-point form"
    values = integer_graph.integer_activations(x)
    from qcompile.requantization import apply_staircase
    for op in fixed:
        source = values[op.input]
        fmt = integer_graph.values[op.input]
        if isinstance(fmt, ir.CodeFormat):
            source = fmt.levels[source]
        assert torch.equal(values[op.name],
                           apply_staircase(source, op.thresholds, op.direction))


def test_thresholds_that_are_no_line_keep_their_table():
    qm, x = quantized("small", "qn", 4)
    quantizer = qm.get_submodule("input_quantizers.features_1_0_input")
    with torch.no_grad():
        quantizer.biases[0, 7] += 0.3  # the middle of 15 thresholds off its midpoint
    integer_graph = qcompile.integerize(qm)
    moved = next(op for op in integer_graph.ops if isinstance(op, ir.Requantize)
                 and op.name == "input_quantizers_features_1_0_input")
    assert moved.fixed_point is None
    assert_faithful(qm, x)


@pytest.mark.parametrize("bits", [2, 4])
def test_size_report_counts_bytes_at_the_bits_and_the_bit_planes(bits):
    qm, _ = quantized("small", "qil", bits)
    integer_graph = qcompile.integerize(qm)
    rows = integer_graph.size_rows()
    for row, op in zip(rows, integer_graph.layers(), strict=True):
        c_out, c_in = op.weight.shape[:2]
        kernel = int(torch.Size(op.weight.shape[2:]).numel())
        assert row.planes == row.bits * c_out * kernel * -(-c_in // 32) * 4
        assert row.planes == op.weight.words.nbytes
        assert row.at_bits == -(-row.bits * op.weight.integers.numel() // 8)
        assert row.fp32 == 4 * op.weight.integers.numel()
    lines = integer_graph.size_report().splitlines()
    for row, line in zip(rows, lines[1:], strict=False):
        assert line.split() == [row.layer, str(row.bits), str(row.at_bits), str(row.fp32),
                                f"{row.fp32 / row.at_bits:.1f}x", str(row.planes)]
    at_bits, fp32 = sum(r.at_bits for r in rows), sum(r.fp32 for r in rows)
    assert lines[len(rows) + 1].split()[:4] == ["total", str(at_bits), str(fp32),
                                                f"{fp32 / at_bits:.1f}x"]


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.sigmoid(self.conv(x)).mean(dim=(2, 3)))


def test_an_op_without_an_integer_form_is_an_error_naming_the_node():
    x = torch.randn(4, 1, 8, 8)
    qm = qcompile.quantize(Unsupported(), (x[:1],), bits=4, method="lsq", calib_data=[(x,)])
    with pytest.raises(IntegerizeError, match=r"node (sigmoid|mean)"):
        qcompile.integerize(qm)


def test_a_switched_off_quantizer_is_an_error():
    qm, _ = quantized("small", "lsq", 4)
    next(m for m in qm.modules() if isinstance(m, Quantizer)).enabled = False
    with pytest.raises(IntegerizeError, match="switched off"):
        qcompile.integerize(qm)


def test_integer_graph_checks_its_inputs():
    qm, x = quantized("small", "lsq", 4)
    integer_graph = qcompile.integerize(qm)
    with pytest.raises(IntegerizeError, match="1 input"):
        integer_graph(x, x)
    with pytest.raises(IntegerizeError, match="float tensor"):
        integer_graph((x * 10).long())
