"""quantize-boundaries: quantize the tensors that integer operations other than layers read.

Matches every add of two tensor nodes (``operator.add``, ``torch.add``, ``x.add(y)``: residual
joins), every ``torch.cat``/``torch.concat`` of a list of nodes, and every average pool
(``nn.AvgPool1d/2d``, ``nn.AdaptiveAvgPool1d/2d`` and their functional forms). Each add or cat
gets one activation quantizer shared by all its operands, called by one node per operand right
before it, so the operands share one scale and the integer add or cat is an exact add or cat of
codes; each pool gets a quantizer on its input. ``insert-quantizers`` quantizes only layer
inputs, but integer deployment needs every tensor an integer operation reads to be quantized, so
the simulated model must round these tensors as integer-only inference will. The quantizers live
under the ``boundary_quantizers`` submodule, named after their consumer, and each node records
``node.meta["quant_boundary"]``. Bits: ``boundary_bits`` (default 8). Method:
``boundary_method``, LSQ unless told otherwise (with the LSQ fallback of ``insert-quantizers``
for a method without signed activations). Not the layers' method: the seed papers quantize layer
inputs and weights only, and a boundary is deployment's rounding of a tensor, which a learned
uniform step states best. Measured on mnist5k (``benchmarks/qat_mnist.py``): QIL's own 8-bit
quantizer on the small CNN's pool input, whose interval maps ``x`` affinely rather than onto
itself, brought QIL's W4A4 QAT from 96.4% to 86.9%, and Quantization Networks' holds 255
sigmoids per element. They are calibrated on what the
calibration batches produce in the model as it stands (its input quantizers active). An operand
already read through a boundary quantizer is left alone, so running the pass again changes
nothing.
"""

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcompile.errors import ConfigError
from qcompile.ir.shapes import inference_mode_of
from qcompile.pipeline import PassContext, register_pass
from qcompile.quant.calibration import (
    BOUNDARY_QUANTIZERS,
    CALIB_EXAMPLES,
    batches_for,
    calibrated_activation_quantizer,
)
from qcompile.quant.lsq import LSQQuantizer
from qcompile.quant.registry import get_method


_ADD_FUNCTIONS = (operator.add, torch.add)
_CAT_FUNCTIONS = (torch.cat, torch.concat)
_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_POOL_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)


@dataclass
class Boundary:
    """An op whose tensor inputs must be quantized: the operands still unquantized, and the
    boundary quantizer its other operands already read (which the new ones then share)."""

    consumer: fx.Node
    kind: str
    operands: list[fx.Node]
    shared: str | None


@register_pass("quantize-boundaries")
def quantize_boundaries(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    bits = _boundary_bits(ctx)
    method = get_method(ctx.option("boundary_method", "lsq")).name
    found = _boundaries(gm)
    if not found:
        ctx.note("no residual joins, concatenations or average pools")
        return gm
    pending = [b for b in found if b.operands]
    if not pending:
        ctx.note(f"all {len(found)} residual joins, concatenations and average pools are "
                 "already quantized")
        return gm
    pending = _quantize(gm, pending, bits, method, ctx)
    gm.graph.lint()
    gm.recompile()
    kinds = [b.kind for b in pending]
    ctx.note(f"{method}: {len(pending)} boundaries quantized at {bits} bits ({kinds.count('add')} "
             f"adds, {kinds.count('cat')} concatenations, {kinds.count('pool')} average pools), "
             f"{len(found) - len(pending)} already quantized or not on tensors")
    return gm


def _boundary_bits(ctx: PassContext) -> int:
    bits = ctx.option("boundary_bits", 8)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError(f"boundary_bits must be an integer 1-8, got {bits!r}")
    return bits


def _boundaries(gm: fx.GraphModule) -> list[Boundary]:
    modules = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        kind, operands = _match(node, module)
        if kind is None:
            continue
        operands = list(dict.fromkeys(operands))
        done = [o.target for o in operands if _is_boundary(o)]
        found.append(Boundary(node, kind, [o for o in operands if not _is_boundary(o)],
                              done[0] if done else None))
    return found


def _match(node: fx.Node, module: nn.Module | None) -> tuple[str | None, list[fx.Node]]:
    """The kind of boundary ``node`` is ("add", "cat", "pool") and its operands, or (None, [])."""
    if _is_add(node) and all(isinstance(a, fx.Node) and _holds_tensor(a) for a in node.args):
        return "add", list(node.args)
    if node.op == "call_function" and node.target in _CAT_FUNCTIONS:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        if isinstance(tensors, (list, tuple)) and tensors and all(
                isinstance(t, fx.Node) for t in tensors):
            return "cat", list(tensors)
    pool = isinstance(module, _POOL_MODULES) or (
        node.op == "call_function" and node.target in _POOL_FUNCTIONS)
    source = node.args[0] if node.args else node.kwargs.get("input")
    if pool and isinstance(source, fx.Node):
        return "pool", [source]
    return None, []


def _is_add(node: fx.Node) -> bool:
    plain = len(node.args) == 2 and not node.kwargs
    return plain and ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
                      or (node.op == "call_method" and node.target == "add"))


def _holds_tensor(node: fx.Node) -> bool:
    """False only when shape propagation recorded a value that is not a tensor (a size, say)."""
    kind = node.meta.get("type")
    return kind is None or issubclass(kind, torch.Tensor)


def _is_boundary(node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith(f"{BOUNDARY_QUANTIZERS}.")


def _quantize(gm, pending: list[Boundary], bits: int, method: str, ctx) -> list[Boundary]:
    """Calibrate and insert the quantizers of ``pending``; returns the boundaries quantized
    (those whose operands all turned out to be float tensors)."""
    examples = int(ctx.option("calib_examples", CALIB_EXAMPLES))
    batches = batches_for(ctx, examples, "boundary calibration")
    seen = _record(gm, {o for b in pending for o in b.operands}, batches)
    pending = [b for b in pending if all(seen[o] is not None for o in b.operands)]
    if pending and not hasattr(gm, BOUNDARY_QUANTIZERS):
        gm.add_module(BOUNDARY_QUANTIZERS, nn.Module())
    for boundary in pending:
        target = boundary.shared or _new_quantizer(gm, boundary, bits, method, seen, ctx)
        _insert_nodes(gm, boundary, target)
    return pending


def _new_quantizer(gm, boundary: Boundary, bits, method, seen, ctx) -> str:
    sample = _joint_sample([seen[o] for o in boundary.operands])
    quantizer, fell_back = calibrated_activation_quantizer(method, bits, sample)
    if isinstance(quantizer, LSQQuantizer):
        quantizer.initialize_least_squares(sample)
    container = gm.get_submodule(BOUNDARY_QUANTIZERS)
    suffix = "input" if boundary.kind == "pool" else "operands"
    base = name = f"{boundary.consumer.name}_{suffix}"
    index = 1
    while hasattr(container, name):
        index += 1
        name = f"{base}{index}"
    container.add_module(name, quantizer)
    if fell_back:
        ctx.note(f"{BOUNDARY_QUANTIZERS}.{name}: {method} has no signed activations; "
                 "LSQ quantizes these operands")
    return f"{BOUNDARY_QUANTIZERS}.{name}"


def _insert_nodes(gm: fx.GraphModule, boundary: Boundary, target: str) -> None:
    quantizer = gm.get_submodule(target)
    meta = {"bits": quantizer.bits, "method": quantizer.method, "signed": quantizer.signed,
            "kind": boundary.kind, "consumer": boundary.consumer.name}
    for operand in boundary.operands:
        with gm.graph.inserting_before(boundary.consumer):
            node = gm.graph.call_module(target, (operand,))
        node.meta["quant_boundary"] = dict(meta)
        boundary.consumer.replace_input_with(operand, node)


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps the values of ``nodes`` (None for one that is not a float tensor)."""

    def __init__(self, gm: fx.GraphModule, nodes: set[fx.Node]):
        super().__init__(gm)
        self.values: dict[fx.Node, list | None] = {node: [] for node in nodes}

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if self.values.get(node) is not None:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                self.values[node].append(value.detach().clone())
            else:
                self.values[node] = None
        return value


def _record(gm, nodes: set[fx.Node], batches) -> dict[fx.Node, torch.Tensor | None]:
    """Each node's value on ``batches`` in eval mode, concatenated along the batch dimension."""
    recorder = _Recorder(gm, nodes)
    with inference_mode_of(gm):
        for batch in batches:
            recorder.run(*batch)
    return {node: None if values is None else torch.cat([torch.atleast_1d(v) for v in values])
            for node, values in recorder.values.items()}


def _joint_sample(samples: list[torch.Tensor]) -> torch.Tensor:
    """The operands' values as one calibration tensor: joined along the batch when their shapes
    agree (an add), along channels when only channel counts differ (a channel concatenation),
    else flattened, which a per-tensor activation quantizer takes as well."""
    if len({s.shape[1:] for s in samples}) == 1:
        return torch.cat(samples)
    if samples[0].dim() > 1 and len({(s.shape[0], s.shape[2:]) for s in samples}) == 1:
        return torch.cat(samples, dim=1)
    return torch.cat([s.reshape(-1) for s in samples])
