"""The lowering's glue rules: affine levels and staircase tables against the reference, and a
small residual network whose adds are folded into their readers and whose max pool runs before
its requantizations (some of them falling: a signed pool), bit-exact value by value."""

from dataclasses import replace

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qcompile
from batch_norms import randomize_batch_norms
from cpu_targets import AMX_CPU, BIT_SERIAL, HOST_HAS_AMX
from qcompile import integer_ir as ir
from qcompile.backends.tvm import glue_plan
from qcompile.backends.tvm.lower import lower
from qcompile.backends.tvm.target import resolve_target
from qcompile.requantization import apply_staircase, fixed_point

EXAMPLES = settings(max_examples=40, deadline=None)


@EXAMPLES
@given(a=st.integers(-3, 3), b=st.integers(-200, 200), n=st.integers(1, 16),
       bump=st.integers(0, 15))
def test_affine_levels_are_found_exactly(a, b, n, bump):
    levels = a * torch.arange(n) + b
    assert glue_plan.affine_levels(levels) == ((a if n > 1 else 1), b)
    if n > 2:
        levels[bump % n] += 1
        assert glue_plan.affine_levels(levels) is None


@EXAMPLES
@given(rows=st.integers(1, 4), levels=st.sampled_from((1, 3, 15, 255)),
       bound=st.integers(1, 700), seed=st.integers(0, 2**31 - 1))
def test_a_staircase_table_is_the_staircase_on_the_whole_range(rows, levels, bound, seed):
    rng = np.random.default_rng(seed)
    thresholds = torch.from_numpy(np.sort(rng.integers(-bound - 2, bound + 2, (rows, levels)),
                                          axis=1))
    direction = torch.from_numpy(rng.choice([-1, 1], rows))
    op = ir.Requantize("q", "v", thresholds, direction)
    fmt = ir.Accumulator(torch.ones(1), torch.zeros(1), bound)
    low, table = glue_plan.staircase_table(op, fmt)
    assert low == -bound and table.shape == (rows, 2 * bound + 1) and table.dtype == np.uint8
    values = torch.arange(-bound, bound + 1).reshape(1, 1, -1).repeat(1, rows, 1)
    np.testing.assert_array_equal(table, apply_staircase(values, thresholds, direction)[0])
    wide = ir.Accumulator(torch.ones(1), torch.zeros(1), glue_plan.TABLE_WIDTH)
    assert glue_plan.staircase_table(op, wide) is None
    form = fixed_point(thresholds, bound)
    if form is not None:
        assert glue_plan.staircase_table(ir.Requantize("q", "v", thresholds, direction, form),
                                         fmt) is None


class Residual(nn.Module):
    """A stem, a 3x3 stride-2 max pool, one residual block and a classifier: ResNet's glue."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width))
        self.relu = nn.ReLU()
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = self.relu(self.body(x) + x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _with_falling_stem(graph: ir.IntegerGraph) -> ir.IntegerGraph:
    """The program with every other direction of the requantizations before a max pool
    negated: a staircase falling in ``V`` there (another program, just as valid)."""
    pooled = {op.input for op in graph.ops if isinstance(op, ir.MaxPool)}

    def falling(op):
        if op.name not in pooled:
            return op
        signs = torch.tensor([(-1) ** (k + 1) for k in range(len(op.direction))])
        return replace(op, direction=op.direction * signs)

    return replace(graph, ops=[falling(op) for op in graph.ops])


def test_a_residual_network_is_bit_exact_with_folded_adds_pooled_first_and_packed():
    torch.manual_seed(0)
    model = randomize_batch_norms(Residual(), 2).eval()
    x = torch.randn(2, 3, 15, 15, generator=torch.Generator().manual_seed(1))
    qm = qcompile.quantize(model, (x[:1],), bits=2, method="lsq", calib_data=[(x,)])
    graph = _with_falling_stem(qcompile.integerize(qm))
    lowered = lower(graph, (1, 3, 15, 15), resolve_target(BIT_SERIAL))
    main = str(lowered.module["main"])
    pools = [op for op in graph.ops if isinstance(op, ir.MaxPool)]
    assert len(pools) == 2 and "lookup_" not in main and "add2_" not in main, main
    assert main.count("maxpool_1x8x15x15") == 1 and "_signed" in main, main
    assert "_po2" in main and "_pi" in main and "unpack_" not in main, (
        "the body's two bit-serial convs pass packed planes, unpacked in the trace only")
    assert "add1_" not in main and main.count("quantize_1x3x15x15") == 1, (
        "the input quantizer stores the integers the 8-bit stem reads, its codes in the trace")
    _assert_bit_exact(graph, x, BIT_SERIAL)


class ResidualThenConv(Residual):
    """The residual block's output read by a conv only: its requantization is a glue kernel."""

    def __init__(self, width: int = 8):
        super().__init__(width)
        self.tail = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = self.tail(self.relu(self.body(x) + x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_a_requantization_read_by_bit_serial_convs_only_stores_packed_planes():
    torch.manual_seed(0)
    model = randomize_batch_norms(ResidualThenConv(), 2).eval()
    x = torch.randn(2, 3, 15, 15, generator=torch.Generator().manual_seed(2))
    qm = qcompile.quantize(model, (x[:1],), bits=2, method="lsq", calib_data=[(x,)])
    graph = qcompile.integerize(qm)
    main = str(lower(graph, (1, 3, 15, 15), resolve_target(BIT_SERIAL)).module["main"])
    packed = [line for line in main.splitlines() if "requantize_" in line and "_po2" in line]
    assert packed, main
    _assert_bit_exact(graph, x, BIT_SERIAL)


def test_amx_convs_and_requantizations_store_codes_in_the_readers_layout():
    """On an AMX CPU the body's first conv stores its codes in the second's layout only, and
    so do the requantizations whose codes only AMX convs read (the block input's for the body,
    the block output's for the tail); the trace unpacks them. Nothing is stored twice or
    packed. Lowered for any machine, run where AMX is."""
    torch.manual_seed(0)
    model = randomize_batch_norms(ResidualThenConv(), 2).eval()
    x = torch.randn(2, 3, 15, 15, generator=torch.Generator().manual_seed(2))
    qm = qcompile.quantize(model, (x[:1],), bits=2, method="lsq", calib_data=[(x,)])
    graph = qcompile.integerize(qm)
    target = "llvm" if HOST_HAS_AMX else AMX_CPU
    lowered = lower(graph, (1, 3, 15, 15), resolve_target(target))
    main, trace = str(lowered.module["main"]), str(lowered.module["trace"])
    calls = [line for line in main.splitlines() if "call_tir" in line]
    convs = [line for line in calls if "amx_conv_" in line]
    assert len(convs) == 3 and sum("_to_" in line for line in convs) == 1, main
    requantizations = [line for line in calls if "requantize_" in line]
    assert sum("_to_" in line for line in requantizations) == 2, main
    assert not any("amx_pack_" in line for line in calls), main
    assert "amx_unpack_" not in main and "amx_unpack_" in trace
    assert lowered.kernels == {"stem.0": "direct int8", "body.0": "amx", "body.3": "amx",
                               "tail.0": "amx", "head": "direct int8"}
    if HOST_HAS_AMX:
        _assert_bit_exact(graph, x)


def _assert_bit_exact(graph: ir.IntegerGraph, x: torch.Tensor, target="llvm") -> None:
    """Every traced value of the compiled program equals the reference's, on each sample."""
    compiled = qcompile.compile(graph, target, input_shape=(1, *x.shape[1:]))
    for sample in x.split(1):
        produced = compiled.integer_activations(sample)
        expected = graph.integer_activations(sample)
        glue_ops = [op.name for op in graph.ops
                    if isinstance(op, (ir.Add, ir.MaxPool, ir.Requantize))]
        assert set(glue_ops) <= set(produced), "a glue value is not traced"
        for name, value in produced.items():
            if ":" in name:
                continue
            if value.is_floating_point():
                torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(value, expected[name]), name
        torch.testing.assert_close(torch.from_numpy(compiled(sample.numpy())),
                                   expected[graph.output], rtol=1e-6, atol=1e-6)
