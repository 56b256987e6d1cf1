"""The per-layer report: rows read from the traced graph, MACs checked against torch's counter."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import qcompile
from qcompile.report import LayerRow, format_table, layer_report, size_ratio


class Scaled(nn.Module):
    """A layer type qcompile does not know, holding a ``weight``: it must still be reported."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, 1))

    def forward(self, x):
        return x * self.weight


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(3, 6, 3, groups=3)
        self.act = nn.ReLU()
        self.scaled = Scaled(6)
        self.fc = nn.Linear(6 * 8, 5, bias=False)

    def forward(self, x):
        y = self.scaled(self.act(self.conv1d(x)))
        return self.fc(y.flatten(1))


def traced_mixed():
    x = torch.randn(2, 3, 10)
    return qcompile.trace(Mixed(), (x,), leaf_modules=[Scaled]), x


def test_rows_follow_graph_order_with_shapes_params_and_macs():
    gm, _ = traced_mixed()
    rows = {row.path: row for row in layer_report(gm)}

    assert list(rows) == ["conv1d", "scaled", "fc"]
    conv = rows["conv1d"]
    assert conv.layer_type == "Conv1d"
    assert (conv.input_shape, conv.output_shape) == ((2, 3, 10), (2, 6, 8))
    assert conv.params == 6 * 1 * 3 + 6
    assert conv.macs == (2 * 6 * 8) * (3 // 3) * 3
    assert rows["fc"].params == 5 * 48 and rows["fc"].macs == (2 * 5) * 48
    assert rows["scaled"].layer_type == "Scaled" and rows["scaled"].macs == 2 * 6 * 8
    assert all(row.method is None and row.weight_bits is None for row in rows.values())


def test_quantization_settings_come_from_node_meta():
    gm, _ = traced_mixed()
    fc = next(n for n in gm.graph.nodes if n.target == "fc")
    fc.meta["quant"] = {"method": "qil", "weight_bits": 2, "act_bits": 4}
    rows = {row.path: row for row in layer_report(gm)}

    assert (rows["fc"].method, rows["fc"].weight_bits, rows["fc"].act_bits) == ("qil", 2, 4)
    table = format_table(list(rows.values())).splitlines()
    method = table[0].index("method")
    fc_line = next(line for line in table if line.startswith("fc "))
    conv_line = next(line for line in table if line.startswith("conv1d "))
    assert fc_line[method:].split()[:3] == ["qil", "2", "4"]
    assert conv_line[method:].split()[:3] == ["-", "-", "-"]


class Wrapper(nn.Module):
    """Like the fused and quantized layers: the weight lives in the wrapped ``.layer``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.step = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.layer(x) * self.step


def test_wrapped_layers_are_reported_with_the_inner_weight():
    model = nn.Sequential(Wrapper(Wrapper(nn.Conv2d(2, 4, 3))), nn.ReLU(), Wrapper(nn.Identity()))
    x = torch.randn(1, 2, 5, 5)
    (row,) = layer_report(qcompile.trace(model, (x,), leaf_modules=[Wrapper]))
    assert (row.path, row.layer_type) == ("0", "Wrapper(Conv2d)")
    assert row.params == 4 * 2 * 9 + 4  # the layer's own weight and bias, not the wrappers' extras
    assert row.macs == (4 * 3 * 3) * (2 * 9)


def test_graph_without_shapes_reports_dashes():
    gm = qcompile.trace(Mixed())
    rows = layer_report(gm)
    assert all(row.input_shape is None and row.macs is None for row in rows)
    line = next(line for line in format_table(rows).splitlines() if line.startswith("fc "))
    assert line.split()[2:4] == ["-", "-"]


def test_table_columns_align_and_total_adds_up():
    rows = [
        LayerRow("a", "Conv2d", (1, 3, 8, 8), (1, 4, 8, 8), 112, 6912),
        LayerRow("block.long_name", "Linear", (1, 10), (1, 1000), 11000, 10000, "lsq", 3, 8),
    ]
    lines = format_table(rows).splitlines()
    header, data, total = lines[0], lines[2:-1], lines[-1]

    type_column = header.index("type")
    assert [line[type_column:].split()[0] for line in data] == ["Conv2d", "Linear"]
    params_end = header.index("params") + len("params")
    assert [line[:params_end].split()[-1] for line in data] == ["112", "11,000"]
    assert "11,112 params" in total and "16,912 MACs" in total
    assert "43.4 KiB as fp32" in total and "2 layers" in total
    packed = 112 * 4 + 11000 * 3 / 8
    assert f"{packed / 1024:.1f} KiB at the assigned bits ({11112 * 4 / packed:.1f}x smaller)" in total


def _single_layer_macs(layer: nn.Module, shape) -> tuple[int, int]:
    x = torch.randn(shape)
    (row,) = layer_report(qcompile.trace(nn.Sequential(layer), (x,)))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        layer(x)
    return row.macs, counter.get_total_flops() // 2


@settings(max_examples=30, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 4]),
    out_per_group=st.integers(1, 3),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 2),
    size=st.integers(4, 9),
    two_d=st.booleans(),
)
def test_conv_macs_match_torch_flop_counter(groups, out_per_group, kernel, stride, size, two_d):
    conv_type = nn.Conv2d if two_d else nn.Conv1d
    conv = conv_type(4, groups * out_per_group, kernel, stride=stride, groups=groups, bias=False)
    shape = (2, 4, size, size) if two_d else (2, 4, size)
    ours, torch_count = _single_layer_macs(conv, shape)
    assert ours == torch_count


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), features=st.integers(1, 16), outputs=st.integers(1, 16))
def test_linear_macs_match_torch_flop_counter(batch, features, outputs):
    linear = nn.Linear(features, outputs, bias=False)
    ours, torch_count = _single_layer_macs(linear, (batch, features))
    assert ours == torch_count


def test_size_ratio_says_larger_when_the_packed_form_is():
    """A tiny model's requantization tables can outweigh its float weights."""
    assert size_ratio(100, 1200) == "12.0x smaller"
    assert size_ratio(44280, 36256) == "1.2x larger"
