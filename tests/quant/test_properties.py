"""Properties every registered quantization method keeps, whatever its paper.

For each method in :func:`qcompile.quant.available_methods`, each role, bits 1-8, per tensor and
per output channel (weights): in hard mode the output takes at most ``2^b`` values per channel, is
monotone in the input, is idempotent (for projections), and equals its integer meaning bit for bit;
in training mode gradients reach every learnable parameter and the input, and compiled, an
activation quantizer passes no ``bool`` tensor between kernels. Each method must support
signed weights and unsigned activations; the other signedness is tested wherever the method accepts
it (it may refuse with a ConfigError).

Hypothesis draws the shapes, the scales, the calibration tensor, a perturbation of the learnable
parameters away from their initialization, and inputs that mix ordinary values with zeros, outliers
and values on and next to the quantizer's own decision boundaries.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code

from qcompile.errors import ConfigError
from qcompile.quant import available_methods, make_quantizer

BITS = range(1, 9)
SETTINGS = settings(max_examples=8, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _accepts(method, role, bits, signed, per_channel):
    try:
        make_quantizer(method, role, bits, signed=signed, per_channel=per_channel, channels=2)
    except ConfigError:
        return False
    return True


def _cases():
    for method in available_methods():
        for bits in BITS:
            for per_channel in (False, True):
                yield method, "weight", bits, True, per_channel
                if _accepts(method, "weight", bits, False, per_channel):
                    yield method, "weight", bits, False, per_channel
            yield method, "activation", bits, False, False
            if _accepts(method, "activation", bits, True, False):
                yield method, "activation", bits, True, False


def _case_id(case):
    method, role, bits, signed, per_channel = case
    sign = "signed" if signed else "unsigned"
    return f"{method}-{role}-{bits}b-{sign}-{'channel' if per_channel else 'tensor'}"


CASES = list(_cases())
cases = pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])

weight_shapes = st.tuples(st.integers(1, 4), st.integers(1, 6)).flatmap(
    lambda ck: st.sampled_from([ck, (*ck, 3, 3)]))
activation_shapes = st.one_of(
    st.tuples(st.integers(1, 3), st.integers(1, 12)),
    st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
)


@st.composite
def scenarios(draw, role):
    """Everything random about one example, as plain numbers a generator expands into tensors."""
    return {
        "seed": draw(st.integers(0, 2**31 - 1)),
        "shape": draw(weight_shapes if role == "weight" else activation_shapes),
        "init_scale": draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0])),
        "nonnegative_calibration": draw(st.booleans()),
        "perturb": draw(st.booleans()),
        "input_scale": draw(st.sampled_from([0.3, 1.0, 4.0])),
        "specials": draw(st.integers(0, 6)),
        "boundaries": draw(st.integers(0, 12)),
    }


def build(case, scenario, *, hard=True):
    """The quantizer, initialized (maybe perturbed), in eval mode, hard or not; and its input."""
    method, role, bits, signed, per_channel = case
    shape = scenario["shape"]
    gen = torch.Generator().manual_seed(scenario["seed"])
    q = make_quantizer(method, role, bits, signed=signed, per_channel=per_channel,
                       channels=shape[0], channel_axis=0)
    calibration = torch.randn(shape, generator=gen) * scenario["init_scale"]
    if scenario["nonnegative_calibration"]:
        calibration = calibration.abs()
    q.initialize(calibration)
    if scenario["perturb"]:
        with torch.no_grad():
            for p in q.parameters():
                p.mul_(torch.exp(0.25 * torch.randn(p.shape, generator=gen)))
    q.eval()
    q.set_hard(hard)
    x = torch.randn(shape, generator=gen) * scenario["init_scale"] * scenario["input_scale"]
    x = _with_specials(x, scenario, gen)
    x = _with_boundaries(x, q, scenario["boundaries"], gen)
    return q, x


def _with_specials(x, scenario, gen):
    flat = x.reshape(-1).clone()
    big = 1e4 * scenario["init_scale"]
    pool = torch.tensor([0.0, -0.0, big, -big, 1e-30, -1e-30])
    for _ in range(scenario["specials"]):
        at = torch.randint(flat.numel(), (1,), generator=gen)
        pick = torch.randint(pool.numel() + 1, (1,), generator=gen)
        source = flat[torch.randint(flat.numel(), (1,), generator=gen)]
        flat[at] = pool[pick] if pick < pool.numel() else source
    return flat.reshape(x.shape)


def _boundary_table(q):
    """Per channel, the inputs where the code changes and their float neighbours."""
    spec = q.integer_spec()
    if spec.thresholds is not None:
        edges = spec.thresholds.float()
        edges = edges.reshape(1, -1) if edges.dim() == 1 else edges
    else:
        scale = spec.scale.reshape(-1, 1).float()
        midpoints = spec.codes[:-1].float() + 0.5 - spec.zero_point.reshape(-1, 1).float()
        edges = midpoints * scale
    up = torch.nextafter(edges, torch.full_like(edges, math.inf))
    down = torch.nextafter(edges, torch.full_like(edges, -math.inf))
    return torch.cat([edges, up, down], dim=1)


def _with_boundaries(x, q, count, gen):
    table = _boundary_table(q)
    if count == 0 or table.shape[1] == 0:
        return x
    rows = x.reshape(x.shape[0], -1).clone()
    for _ in range(count):
        row = int(torch.randint(rows.shape[0], (1,), generator=gen))
        edges = table[row % table.shape[0]]
        col = torch.randint(rows.shape[1], (1,), generator=gen)
        rows[row, col] = edges[torch.randint(edges.numel(), (1,), generator=gen)]
    return rows.reshape(x.shape)


def channel_rows(t, per_channel):
    return t.reshape(t.shape[0], -1) if per_channel else t.reshape(1, -1)


def assert_matches_spec(q, x, y, bits):
    spec = q.integer_spec()
    codes = spec.quantize(x)
    assert codes.dtype == torch.int64 and codes.shape == x.shape
    assert spec.codes.dim() == 1 and len(spec.codes) <= 2**bits
    assert bool((spec.codes[1:] > spec.codes[:-1]).all()), "spec codes must ascend"
    assert bool(torch.isin(codes, spec.codes).all()), "a code outside spec.codes"
    expected = spec.dequantize(codes)
    mismatch = (expected != y).nonzero()
    assert mismatch.numel() == 0, (
        f"forward != integer meaning at {mismatch[:3].tolist()}: x={x[tuple(mismatch[0])]!r} "
        f"forward={y[tuple(mismatch[0])]!r} spec={expected[tuple(mismatch[0])]!r}"
    )


@cases
@SETTINGS
@given(data=st.data())
def test_hard_forward_properties(case, data):
    method, role, bits, signed, per_channel = case
    q, x = build(case, data.draw(scenarios(role)))
    with torch.no_grad():
        y = q(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert bool(torch.isfinite(y).all())

    for row in channel_rows(y, per_channel):
        assert row.unique().numel() <= 2**bits, "more distinct outputs than 2^bits"

    for x_row, y_row in zip(channel_rows(x, per_channel), channel_rows(y, per_channel)):
        ordered = y_row[torch.argsort(x_row, stable=True)]
        assert bool((ordered[1:] >= ordered[:-1]).all()), "output not monotone in the input"

    assert_matches_spec(q, x, y, bits)

    with torch.no_grad():
        again = q(y)
    if q.projection:
        assert torch.equal(again, y), "q(q(x)) != q(x)"
    else:
        assert_matches_spec(q, y, again, bits)


@cases
@SETTINGS
@given(data=st.data())
def test_gradients_are_finite(case, data):
    q, x = build(case, data.draw(scenarios(case[1])), hard=False)
    q.train()
    x.requires_grad_(True)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (q(x) * weights).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    for name, p in q.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert bool(torch.isfinite(p.grad).all()), f"gradient of {name} is not finite"


@cases
def test_gradients_reach_every_parameter(case):
    """Over a few ordinary inputs, every parameter (each channel's) and the input get a gradient."""
    method, role, bits, signed, per_channel = case
    shape = (3, 4, 3, 3) if role == "weight" else (4, 3, 5, 5)
    gen = torch.Generator().manual_seed(bits)
    q = make_quantizer(method, role, bits, signed=signed, per_channel=per_channel,
                       channels=shape[0])
    calibration = torch.randn(shape, generator=gen)
    q.initialize(calibration if role == "weight" or signed else calibration.relu())
    q.train()
    reached = {name: torch.zeros(p.shape, dtype=torch.bool) for name, p in q.named_parameters()}
    input_reached = False
    for factor in (0.5, 1.0, 2.0, 8.0):
        q.zero_grad()
        x = (calibration * factor).requires_grad_(True)
        (q(x) * torch.randn(shape, generator=gen)).sum().backward()
        input_reached |= bool((x.grad != 0).any())
        for name, p in q.named_parameters():
            reached[name] |= p.grad != 0
    assert input_reached, "the input never gets a gradient"
    missing = [name for name, hit in reached.items() if not _every_channel(hit, q)]
    assert not missing, f"no nonzero gradient ever reaches {missing} (in some channel)"


def _every_channel(hit, q):
    """Some element of the parameter was reached, in every channel when it is per channel."""
    if q.per_channel and hit.dim() >= 1 and hit.shape[0] == q.channels:
        return bool(hit.reshape(q.channels, -1).any(dim=1).all())
    return bool(hit.any())


STRAIGHT_THROUGH = [m for m in available_methods()
                    if not hasattr(make_quantizer(m, "activation", 2, signed=False),
                                   "set_temperature")]
"""Methods whose activation gradient is straight through (not a soft function's, as QN's)."""


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("method", STRAIGHT_THROUGH)
def test_activation_gradient_is_straight_through_inside_the_range(method, bits):
    """Freshly initialized, an unsigned activation quantizer passes the gradient unchanged (1)
    wherever the code lies strictly between its lowest and highest, at every bit-width: the
    surrogate behind the gradient has the scale of the value it stands for."""
    gen = torch.Generator().manual_seed(bits)
    q = make_quantizer(method, "activation", bits, signed=False)
    x = torch.rand(4096, generator=gen) * 3
    q.initialize(x)
    q.train()
    x.requires_grad_(True)
    q(x).sum().backward()
    spec = q.integer_spec()
    codes = spec.quantize(x.detach())
    inside = (codes > spec.codes.min()) & (codes < spec.codes.max())
    assert int(inside.sum()) > 1000
    torch.testing.assert_close(x.grad[inside], torch.ones(int(inside.sum())))


def _activation_cases():
    for method in available_methods():
        for signed in (False, True):
            if _accepts(method, "activation", 4, signed, False):
                yield pytest.param(method, signed, id=f"{method}-{'signed' if signed else 'unsigned'}")


@pytest.mark.parametrize("method, signed", list(_activation_cases()))
def test_compiled_activation_quantizer_passes_no_bool_tensors(method, signed):
    """Compiled, no kernel of an activation quantizer's forward or backward pass writes or reads a
    ``bool`` tensor: inductor's CPU code moves those element by element, and a mask saved for the
    backward pass that way made PACT's and DoReFa's quantizers 5-13 times slower
    (:func:`qcompile.quant.base.step_mask`)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    q = make_quantizer(method, "activation", 4, signed=signed)
    x = torch.randn(2, 8, 16, 16, generator=gen) * 3
    q.initialize(x if signed else x.relu())
    q.train()
    compiled = torch.compile(q, dynamic=False, fullgraph=True)

    def step():
        xs = x.clone().requires_grad_()
        (compiled(xs) * torch.linspace(-1, 1, x.numel()).reshape(x.shape)).sum().backward()
        return xs.grad

    grad, codes = run_and_get_code(step)
    assert len(codes) == 2 and grad.abs().sum() > 0
    for code in codes:
        assert "bool*" not in code
