"""``integerize``: a trained quantized fx graph to an :class:`~qcompile.integer_ir.IntegerGraph`.

The integer program computes, exactly, what the simulated model computes in hard mode (every
quantizer at its integer meaning, batch norm folded, eval mode). It is built backwards from each
quantizer: a quantizer's codes are a function of the nearest integer *source* above it,

- a layer (conv, linear, fused conv-BN): ``V = sum(w * a)``, meaning ``V * s_a * s_w[c] + bias[c]``;
- a residual ``add`` of codes of one shared quantizer (``quantize-boundaries`` puts one there):
  the sum of their integers, meaning ``V * s``;
- an average pool of codes: the window sums, meaning ``V * s / window``;
- another quantizer's codes, or the float graph input,

through ops that commute with a monotone per-channel staircase: clamps (ReLU, ReLU6, hardtanh,
folded into the staircase), dropout and identity (nothing), max pooling and flatten (applied to
the codes afterwards, since a non-decreasing quantizer commutes with max). The staircase itself is
:func:`qcompile.requantization.staircase`. Any other op on the way is an
:class:`~qcompile.errors.IntegerizeError` naming the node. The graph's output is the last layer's
accumulator dequantized to float.
"""

import copy
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcompile import integer_ir as ir
from qcompile.errors import IntegerizeError
from qcompile.fused import ConvBatchNorm
from qcompile.packing import pack_bits
from qcompile.quant.base import IntegerSpec, Quantizer
from qcompile.quant.layers import base_layer, float_weight, is_quantizable
from qcompile.requantization import decision_thresholds, fixed_point, staircase

CLAMPS = {nn.ReLU: (0.0, math.inf), nn.ReLU6: (0.0, 6.0)}
CLAMP_FUNCTIONS = {F.relu: (0.0, math.inf), torch.relu: (0.0, math.inf), F.relu6: (0.0, 6.0)}
IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
ADDS = (operator.add, torch.add)
AVERAGE_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
AVERAGE_POOL_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                          F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def integerize(qmodel: fx.GraphModule) -> ir.IntegerGraph:
    """The integer program of the quantized graph ``qmodel`` (from ``qcompile.quantize``).

    Works on a float64 copy in eval mode (``qmodel`` is left as it is): quantizer thresholds,
    folded batch norm and scales are taken at float64 precision, so the program is the model's
    exact meaning and float32 evaluations of the model differ from it only at rounding ties.
    """
    if not isinstance(qmodel, fx.GraphModule):
        raise IntegerizeError(f"integerize takes the fx GraphModule qcompile.quantize returns, "
                              f"got {type(qmodel).__name__}")
    exact = copy.deepcopy(qmodel).double().eval()
    with torch.no_grad():
        return _Lowering(exact).run()


class _Lowering:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.ops: list[ir.Op] = []
        self.values: dict[str, object] = {}
        self.inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self.done: set[str] = set()

    def run(self) -> ir.IntegerGraph:
        for node in self.gm.graph.nodes:
            if self._quantizer(node) is not None:
                self._codes(node)
        outputs = [n for n in self.gm.graph.nodes if n.op == "output"][0].args[0]
        if not isinstance(outputs, fx.Node):
            raise IntegerizeError("integerize supports models with one tensor output; this one "
                                  f"returns {type(outputs).__name__}")
        name = self._output(outputs)
        shapes = [_shape(n) for n in self.gm.graph.nodes if n.op == "placeholder"]
        return ir.IntegerGraph(self.ops, self.inputs, name, self.values, shapes)

    # -- quantizers ---------------------------------------------------------------------------

    def _quantizer(self, node: fx.Node) -> Quantizer | None:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        return module if isinstance(module, Quantizer) else None

    def _codes(self, node: fx.Node) -> str:
        """Emit the ops that compute quantizer ``node``'s codes; return their value name."""
        if node.name in self.done:
            return node.name
        quantizer = self._quantizer(node)
        if not quantizer.enabled:
            raise IntegerizeError(f"quantizer {node.target} is switched off (stochastic "
                                  "precision?): switch every quantizer on before integerizing")
        spec = quantizer.integer_spec()
        fmt = self._format(spec, str(node.target))
        source, (low, high), structure = self._walk(node.args[0], node)
        staged = node.name if not structure else f"{node.name}.staircase"
        if source.op == "placeholder":
            self._emit(ir.Quantize(staged, source.name, spec, low, high), fmt)
        else:
            integer = self._source(source, node)
            self._requantize(staged, integer, spec, low, high, fmt)
        self._replay(structure, staged, node.name, fmt)
        self.done.add(node.name)
        return node.name

    def _format(self, spec: IntegerSpec, where: str) -> ir.CodeFormat:
        if spec.scale.numel() > 1 or spec.zero_point.numel() > 1:
            raise IntegerizeError(f"{where} quantizes per channel; an integer layer needs one "
                                  "scale for its whole input: quantize activations per tensor")
        if spec.values is not None:
            raise IntegerizeError(f"{where} has non-uniform activation levels, which no "
                                  "integer layer can multiply")
        levels, divisor = _integer_levels(spec.codes, spec.zero_point.reshape(1))
        return ir.CodeFormat(spec.bits, levels[0], float(spec.scale) / divisor, where)

    def _requantize(self, name, integer: str, spec, low, high, fmt) -> None:
        source = self.values[integer]
        if isinstance(source, ir.CodeFormat):
            scale, bias, bound = torch.tensor([source.scale]), torch.zeros(1), source.peak
        else:
            scale, bias, bound = source.scale, source.bias, source.bound
        thresholds, direction = staircase(scale, bias, decision_thresholds(spec), bound,
                                          low, high)
        exact = fixed_point(thresholds, bound)
        self._emit(ir.Requantize(name, integer, thresholds, direction, exact), fmt)

    # -- walking up through ops that commute with a staircase ---------------------------------

    def _walk(self, node: fx.Node, reader: fx.Node):
        """The integer source above ``node``, the clamp the elementwise ops on the way make, and
        the structural ops on the way (in forward order)."""
        low, high = -math.inf, math.inf
        structure = []
        while True:
            clamp = self._clamp(node)
            if clamp is not None:
                low, high = max(low, clamp[0]), min(high, clamp[1])
            elif self._is_identity(node):
                pass
            elif self._is_structural(node):
                structure.insert(0, node)
            else:
                return node, (low, high), structure
            node = node.args[0]
            if not isinstance(node, fx.Node):
                raise IntegerizeError(f"{reader.name} reads a constant; nothing to integerize")

    def _clamp(self, node: fx.Node) -> tuple[float, float] | None:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if module is not None:
            if type(module) in CLAMPS:
                return CLAMPS[type(module)]
            if isinstance(module, nn.Hardtanh):
                return float(module.min_val), float(module.max_val)
            return None
        if node.op == "call_function" and node.target in CLAMP_FUNCTIONS:
            return CLAMP_FUNCTIONS[node.target]
        if node.op == "call_function" and node.target is F.hardtanh:
            low = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
            high = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
            return float(low), float(high)
        if node.op == "call_method" and node.target in ("relu", "relu_"):
            return 0.0, math.inf
        return None

    def _is_identity(self, node: fx.Node) -> bool:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if module is not None:
            return isinstance(module, IDENTITIES)
        if node.op == "call_function":
            return node.target is F.dropout
        return node.op == "call_method" and node.target == "contiguous"

    def _is_structural(self, node: fx.Node) -> bool:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if module is not None:
            return isinstance(module, MAX_POOLS)
        if node.op == "call_function":
            return node.target in (torch.flatten, F.max_pool1d, F.max_pool2d, F.max_pool3d)
        return node.op == "call_method" and node.target == "flatten"

    def _replay(self, structure: list[fx.Node], first: str, last: str, fmt) -> None:
        """Apply max pooling / flatten ops to codes, the last one writing ``last``."""
        current = first
        for index, node in enumerate(structure):
            name = last if index == len(structure) - 1 else f"{last}.{node.name}"
            self._emit(self._structural_op(node, name, current), fmt)
            current = name

    def _structural_op(self, node: fx.Node, name: str, source: str) -> ir.Op:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if module is not None:
            dims = int(type(module).__name__[-2])
            return ir.MaxPool(name, source, _tuple(module.kernel_size, dims),
                              _tuple(module.stride or module.kernel_size, dims),
                              _tuple(module.padding, dims), _tuple(module.dilation, dims),
                              bool(module.ceil_mode))
        if node.target in (F.max_pool1d, F.max_pool2d, F.max_pool3d):
            args = _bind(node, ["input", "kernel_size", "stride", "padding", "dilation",
                                "ceil_mode"])
            dims = int(node.target.__name__[-2])
            kernel = _tuple(args["kernel_size"], dims)
            return ir.MaxPool(name, source, kernel, _tuple(args.get("stride") or kernel, dims),
                              _tuple(args.get("padding", 0), dims),
                              _tuple(args.get("dilation", 1), dims),
                              bool(args.get("ceil_mode", False)))
        args = _bind(node, ["input", "start_dim", "end_dim"])
        return ir.Reshape(name, source, int(args.get("start_dim", 0)),
                          int(args.get("end_dim", -1)))

    # -- integer sources ----------------------------------------------------------------------

    def _source(self, node: fx.Node, reader: fx.Node) -> str:
        if node.name in self.done:
            return node.name
        if self._quantizer(node) is not None:
            return self._codes(node)
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if module is not None and is_quantizable(module):
            return self._layer(node, module)
        if node.op in ("call_function", "call_method") and _is_add(node):
            return self._add(node)
        if (module is not None and isinstance(module, AVERAGE_POOLS)) or (
                node.op == "call_function" and node.target in AVERAGE_POOL_FUNCTIONS):
            return self._pool(node, module)
        if node.op == "call_function" and node.target in (torch.cat, torch.concat):
            return self._concat(node)
        raise IntegerizeError(
            f"node {node.name} ({_describe(node, self.modules)}) feeds quantizer "
            f"{reader.target}, and the integer program has no such op: integerize supports "
            "quantized conv/linear layers, residual add, cat, average and max pooling, "
            "ReLU/ReLU6/hardtanh, flatten and dropout between quantizers")

    def _operand_codes(self, node: fx.Node, operand, role: str) -> str:
        if not isinstance(operand, fx.Node) or self._quantizer(operand) is None:
            raise IntegerizeError(
                f"{role} {node.name} reads {getattr(operand, 'name', operand)}, which is not "
                "quantized: run the quantize-boundaries pass (part of the default pipeline) so "
                "every operand an integer op reads is quantized")
        return self._codes(operand)

    def _layer(self, node: fx.Node, module: nn.Module) -> str:
        layer = base_layer(module)
        quantizer = getattr(module, "weight_quantizer", None)
        if not isinstance(quantizer, Quantizer):
            raise IntegerizeError(f"layer {node.target} has no weight quantizer; it would run "
                                  "in float: quantize it (insert-quantizers) first")
        if not quantizer.enabled:
            raise IntegerizeError(f"the weight quantizer of {node.target} is switched off "
                                  "(stochastic precision?): switch every quantizer on first")
        codes = self._operand_codes(node, node.args[0], "layer")
        fmt = self.values[codes]
        weight = _packed_weight(quantizer, float_weight(module).detach(), str(node.target))
        bias = _bias(module, weight.shape[0])
        bound = _bound(weight, fmt.peak)
        if isinstance(layer, nn.Linear):
            op = ir.Linear(node.name, codes, weight, str(node.target))
        else:
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise IntegerizeError(f"layer {node.target}: only explicit zero padding is "
                                      f"supported, got {layer.padding_mode}/{layer.padding}")
            op = ir.Conv(node.name, codes, weight, tuple(layer.stride), tuple(layer.padding),
                         tuple(layer.dilation), layer.groups, str(node.target))
        scale = fmt.scale * weight.scale.double()
        self._emit(op, ir.Accumulator(scale, bias, bound))
        self.done.add(node.name)
        return node.name

    def _add(self, node: fx.Node) -> str:
        operands = [a for a in node.args if isinstance(a, fx.Node)]
        codes = [self._operand_codes(node, a, "add") for a in operands]
        fmt = self._shared_format(node, codes)
        self._emit(ir.Add(node.name, tuple(codes)),
                   ir.Accumulator(torch.tensor([fmt.scale], dtype=torch.float64),
                                  torch.zeros(1, dtype=torch.float64), len(codes) * fmt.peak))
        self.done.add(node.name)
        return node.name

    def _concat(self, node: fx.Node) -> str:
        args = _bind(node, ["tensors", "dim"])
        codes = [self._operand_codes(node, a, "cat") for a in args["tensors"]]
        fmt = self._shared_format(node, codes)
        self._emit(ir.Concat(node.name, tuple(codes), int(args.get("dim", 0))), fmt)
        self.done.add(node.name)
        return node.name

    def _pool(self, node: fx.Node, module: nn.Module | None) -> str:
        codes = self._operand_codes(node, node.args[0], "average pool")
        fmt = self.values[codes]
        op = _sum_pool(node, module, codes)
        bound = op.divisor * fmt.peak
        scale = torch.tensor([fmt.scale / op.divisor], dtype=torch.float64)
        self._emit(op, ir.Accumulator(scale, torch.zeros(1, dtype=torch.float64), bound))
        self.done.add(node.name)
        return node.name

    def _shared_format(self, node: fx.Node, codes: list[str]) -> ir.CodeFormat:
        formats = [self.values[c] for c in codes]
        first = formats[0]
        if any(f.scale != first.scale or not torch.equal(f.levels, first.levels)
               for f in formats[1:]):
            raise IntegerizeError(f"the operands of {node.name} have different quantizers "
                                  f"({', '.join(f.quantizer for f in formats)}): they must share "
                                  "one (quantize-boundaries makes them share)")
        return first

    def _output(self, node: fx.Node) -> str:
        source, (low, high), structure = self._walk(node, node)
        if structure:
            raise IntegerizeError(f"the output is reached through {structure[-1].name} after the "
                                  "last layer; end the model with its last layer")
        integer = self._source(source, node)
        self._emit(ir.Dequantize("output", integer, low, high), None)
        return "output"

    def _emit(self, op: ir.Op, value) -> None:
        self.ops.append(op)
        self.values[op.name] = value


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    """The example input's shape recorded when the model was traced, if any."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _integer_levels(codes: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Integers ``m * (codes - zero_point)`` per row of ``zero_point``, ``m`` 1 or 2 (2 when a
    zero point is a half integer); exact or an error."""
    shifted = codes.double()[None, :] - zero_point.double().reshape(-1, 1)
    for divisor in (1, 2):
        scaled = shifted * divisor
        if bool((scaled == torch.round(scaled)).all()):
            return scaled.to(torch.int64), divisor
    raise IntegerizeError(f"zero point {zero_point.tolist()} is not a multiple of 1/2")


def _packed_weight(quantizer: Quantizer, weight: torch.Tensor, layer: str) -> ir.PackedWeight:
    spec = quantizer.integer_spec()
    channels = weight.shape[0]
    codes = spec.quantize(weight)
    index = torch.searchsorted(spec.codes, codes.contiguous())
    if spec.values is not None:
        if spec.levels is None:
            raise IntegerizeError(f"{layer}: its weight levels are not integers on a grid")
        levels = spec.levels.reshape(-1, len(spec.codes)).expand(channels, -1)
        scale = spec.scale.double().reshape(-1).expand(channels)
    else:
        zero_point = spec.zero_point.reshape(-1).expand(channels)
        levels, divisor = _integer_levels(spec.codes, zero_point)
        scale = spec.scale.double().reshape(-1).expand(channels) / divisor
    words = pack_bits(index, spec.bits, axis=1)
    return ir.PackedWeight(spec.bits, tuple(weight.shape), words, levels.contiguous().clone(),
                           scale.contiguous().clone())


def _bias(module: nn.Module, channels: int) -> torch.Tensor:
    if isinstance(module, ConvBatchNorm):
        bias = module.folded_bias()
    else:
        bias = base_layer(module).bias
    if bias is None:
        return torch.zeros(channels, dtype=torch.float64)
    return bias.detach().double().reshape(-1).expand(channels).clone()


def _bound(weight: ir.PackedWeight, peak: int) -> int:
    """The largest ``|V|`` the layer can produce: per output channel ``sum |w| * peak``."""
    bound = int(weight.integers.abs().reshape(weight.shape[0], -1).sum(dim=1).max()) * peak
    if bound > ir.INT32_MAX:
        raise IntegerizeError(f"accumulators of {weight.shape} weights can reach {bound}, past "
                              "int32: use fewer input bits or split the layer")
    return bound


def _pool_settings(node: fx.Node, module: nn.Module | None) -> tuple[str, dict]:
    """An average pool's kind ("avg_poolNd" or "adaptive_avg_poolNd") and its arguments."""
    if module is not None:
        kind = {"AvgPool": "avg_pool", "AdaptiveAvgPool": "adaptive_avg_pool"}[
            type(module).__name__[:-2]] + type(module).__name__[-2:].lower()
        names = ["output_size"] if kind.startswith("adaptive") else [
            "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
            "divisor_override"]
        return kind, {n: getattr(module, n) for n in names if hasattr(module, n)}
    kind = node.target.__name__
    names = ["input", "output_size"] if kind.startswith("adaptive") else [
        "input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
        "divisor_override"]
    return kind, _bind(node, names)


def _sum_pool(node: fx.Node, module: nn.Module | None, codes: str) -> ir.SumPool:
    kind, args = _pool_settings(node, module)
    dims = int(kind[-2])
    if kind.startswith("adaptive"):
        meta = node.args[0].meta.get("tensor_meta")
        if meta is None:
            raise IntegerizeError(f"{node.name}: adaptive pooling needs the input shape; trace "
                                  "with example inputs")
        sizes = tuple(meta.shape[2:])
        out = tuple(s if o is None else int(o) for s, o in zip(
            sizes, args["output_size"] if isinstance(args["output_size"], (tuple, list))
            else (args["output_size"],) * dims, strict=True))
        widths = [_adaptive_width(i, o) for i, o in zip(sizes, out, strict=True)]
        if None in widths:
            raise IntegerizeError(f"{node.name}: adaptive pooling of {sizes} to {out} has windows "
                                  "of different sizes; an integer sum needs one divisor")
        return ir.SumPool(node.name, codes, math.prod(widths), output_size=out)
    kernel = _tuple(args["kernel_size"], dims)
    padding = _tuple(args.get("padding") or 0, dims)
    if args.get("ceil_mode") or (args.get("count_include_pad") is False and any(padding)):
        raise IntegerizeError(f"{node.name}: average pooling with ceil_mode or without counting "
                              "the padding has windows of different sizes")
    if args.get("divisor_override"):
        raise IntegerizeError(f"{node.name}: divisor_override is not supported")
    return ir.SumPool(node.name, codes, math.prod(kernel), kernel,
                      _tuple(args.get("stride") or kernel, dims), padding)


def _adaptive_width(length: int, size: int) -> int | None:
    """The window width of adaptive pooling ``length -> size``, None when widths differ."""
    widths = {-((-(i + 1) * length) // size) - (i * length) // size for i in range(size)}
    return widths.pop() if len(widths) == 1 else None


def _is_add(node: fx.Node) -> bool:
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if node.op == "call_function":
        return node.target in ADDS and len(tensors) == 2 and not node.kwargs
    return node.target == "add" and len(tensors) == 2 and not node.kwargs


def _bind(node: fx.Node, names: list[str]) -> dict:
    bound = dict(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


def _tuple(value, dims: int) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    return (int(value),) * dims


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"module {type(modules[node.target]).__name__}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}"
    return f"{node.op} {node.target}"
