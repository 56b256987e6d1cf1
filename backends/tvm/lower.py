"""Lower an :class:`~qcompile.integer_ir.IntegerGraph` to a Relax module of scheduled kernels.

Every op becomes one ``relax.call_tir`` of a pre-scheduled PrimFunc from
:mod:`qcompile.backends.tvm.kernels`; nothing is left for TVM's default pipeline to (not)
schedule. Conv and linear layers run bit-serial (:mod:`.kernels.bitserial`) when both operands
are low-bit codes that stand for themselves (activations ``0..2^b-1``, weights in an unsigned,
two's-complement or bipolar form, bits <= 4, groups = 1) and direct otherwise
(:mod:`.kernels.direct`: 8-bit layers, depthwise convs, learned weight tables). A layer whose
accumulator only feeds one requantization gets it as a fused epilogue, so the accumulator never
reaches memory. Values between ops are int32 tensors of codes (or accumulators).

The module has two functions of the same program: ``main(x, *params) -> logits`` and
``trace(x, *params) -> (value, ...)``, every value by name (:data:`Lowered.traced`), which
``verify`` compares with the simulated model. Parameters (packed weight words, thresholds,
scales) are function inputs, not constants, so the artifact stores them once, packed.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
import tvm
from tvm import relax

from qcompile import integer_ir as ir
from qcompile.backends.reference import run as reference_run
from qcompile.backends.tvm.kernels import glue
from qcompile.backends.tvm.kernels.epilogue import Epilogue
from qcompile.errors import NotDeployableError

BITSERIAL_BITS = 4


@dataclass
class Lowered:
    module: tvm.IRModule
    params: list[np.ndarray]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    traced: list[str]
    kernels: dict[str, str] = field(default_factory=dict)


def lower(graph: ir.IntegerGraph, input_shape: tuple[int, ...], target: tvm.target.Target
          ) -> Lowered:
    """The Relax module of ``graph`` for inputs of ``input_shape`` on ``target``."""
    if len(graph.inputs) != 1:
        raise NotDeployableError("the TVM backend compiles models with one input")
    example = torch.zeros(input_shape)
    shapes = {name: tuple(value.shape) for name, value in reference_run(graph, example).items()}
    builder = _Builder(graph, shapes, target)
    builder.plan()
    module = builder.build(input_shape)
    return Lowered(module, builder.params, tuple(input_shape), shapes[graph.output],
                   builder.traced, builder.kernel_kinds)


class _Builder:
    def __init__(self, graph: ir.IntegerGraph, shapes: dict, target):
        self.graph = graph
        self.shapes = shapes
        self.target = target
        self.params: list[np.ndarray] = []
        self.param_vars: list[relax.Var] = []
        self.kernels: dict[str, tvm.tirx.PrimFunc] = {}
        self.kernel_kinds: dict[str, str] = {}
        self.fused: dict[str, ir.Requantize] = {}
        self.traced: list[str] = []
        self.calls: list[tuple[str, str, list, tuple, str]] = []

    # -- planning: which kernel computes each value -------------------------------------------

    def plan(self) -> None:
        readers: dict[str, list[ir.Op]] = {}
        for op in self.graph.ops:
            for name in _inputs(op):
                readers.setdefault(name, []).append(op)
        for op in self.graph.ops:
            if isinstance(op, (ir.Conv, ir.Linear)):
                after = readers.get(op.name, [])
                if len(after) == 1 and isinstance(after[0], ir.Requantize):
                    self.fused[after[0].name] = op
        for op in self.graph.ops:
            if isinstance(op, (ir.Conv, ir.Linear)) and any(
                    r is op for r in self.fused.values()):
                continue
            getattr(self, f"_plan_{type(op).__name__.lower()}")(op)

    def _call(self, value: str, symbol: str, func, args: list, dtype: str = "int32") -> None:
        """Record ``value = func(*args)``; ``args`` are value names or parameter arrays."""
        if symbol not in self.kernels:
            self.kernels[symbol] = func() if callable(func) else func
        self.calls.append((value, symbol, args, self.shapes[value], dtype))
        self.traced.append(value)

    def _integers(self, name: str) -> str:
        """The value holding the integers ``name``'s codes stand for (a lookup when needed)."""
        fmt = self.graph.values.get(name)
        if not isinstance(fmt, ir.CodeFormat) or _identity(fmt.levels):
            return name
        value = f"{name}:integers"
        shape = self.shapes[name]
        self.shapes[value] = shape
        symbol = f"lookup_{_shape_tag(shape)}_{len(fmt.levels)}"
        self._call(value, symbol,
                   lambda: glue.lookup(shape, len(fmt.levels), self.target, symbol),
                   [name, np.ascontiguousarray(fmt.levels.numpy().astype("int32"))])
        return value

    def _plan_quantize(self, op: ir.Quantize) -> None:
        spec, shape = op.spec, self.shapes[op.input]
        if spec.scale.numel() > 1:
            raise NotDeployableError(f"{op.name}: per-channel input quantization")
        if spec.thresholds is None:
            zero = float(spec.zero_point.reshape(-1)[0])
            args = (float(spec.scale.reshape(-1)[0]), zero, spec.qmin, spec.qmax,
                    int(spec.codes[0]), op.low, op.high)
            symbol = f"quantize_{_shape_tag(shape)}_{abs(hash(args)) % 10**8}"
            self._call(op.name, symbol,
                       lambda: glue.quantize_affine(shape, *args, self.target, symbol), [op.input])
            return
        count = spec.thresholds.shape[-1]
        symbol = f"quantize_t{count}_{_shape_tag(shape)}"
        self._call(op.name, symbol,
                   lambda: glue.quantize_thresholds(shape, count, op.low, op.high, self.target,
                                                    symbol),
                   [op.input, np.ascontiguousarray(spec.thresholds.double().reshape(-1).numpy())])

    def _plan_requantize(self, op: ir.Requantize) -> None:
        epilogue, extra = _epilogue(op)
        layer = self.fused.get(op.name)
        if layer is not None:
            self._plan_layer(layer, op.name, epilogue, extra)
            return
        source = self._integers(op.input)
        shape = self.shapes[source]
        channels = shape[1] if len(shape) > 1 else 1
        symbol = f"requantize_{epilogue.tag}_{_shape_tag(shape)}"
        self._call(op.name, symbol,
                   lambda: glue.requantize(shape, epilogue, channels, self.target, symbol),
                   [source, *extra])

    def _plan_conv(self, op: ir.Conv) -> None:
        self._plan_layer(op, op.name, Epilogue(), [])

    _plan_linear = _plan_conv

    def _plan_layer(self, op, value: str, epilogue: Epilogue, extra: list) -> None:
        from qcompile.backends.tvm.kernels import bitserial, direct

        fmt = self.graph.values[op.input]
        weight = op.weight
        shape_in = self.shapes[op.input]
        conv = isinstance(op, ir.Conv)
        if conv and len(weight.shape) != 4:
            raise NotDeployableError(f"{op.layer}: the TVM backend compiles 2-d convolutions")
        serial = (_identity(fmt.levels) and fmt.bits <= BITSERIAL_BITS
                  and weight.bits <= BITSERIAL_BITS and weight.affine is not None
                  and (not conv or op.groups == 1))
        tag = f"{_shape_tag(shape_in)}_{_shape_tag(weight.shape)}_{epilogue.tag}"
        if serial:
            alpha, beta = weight.affine
            symbol = f"bitserial_{'conv' if conv else 'dense'}_a{fmt.bits}w{weight.bits}" \
                     f"x{alpha}m{beta}_{tag}"
            if conv:
                build = lambda: bitserial.conv2d_kernel(  # noqa: E731
                    shape_in, weight.words.shape, fmt.bits, weight.bits, weight.affine, op.stride,
                    op.padding, op.dilation, epilogue, self.target)
            else:
                build = lambda: bitserial.dense_kernel(  # noqa: E731
                    shape_in, weight.words.shape, fmt.bits, weight.bits, weight.affine, epilogue,
                    self.target)
            self.kernel_kinds[op.layer] = "bit-serial"
            self._call(value, symbol, build, [op.input, np.ascontiguousarray(weight.words), *extra])
            return
        data = self._integers(op.input)
        integers = weight.integers.numpy()
        dtype = direct.weight_dtype(integers)
        span = (int(fmt.levels.min()), int(fmt.levels.max()))
        symbol = f"direct_{'conv' if conv else 'dense'}_{dtype}_{tag}_r{span[0]}_{span[1]}" + (
            f"_g{op.groups}s{_shape_tag(op.stride)}p{_shape_tag(op.padding)}"
            f"d{_shape_tag(op.dilation)}" if conv else "")
        if conv:
            settings = (op.stride, op.padding, op.dilation, op.groups, self.target, span)
            stored = direct.pack_conv2d_weight(integers.astype(dtype), shape_in, *settings)
            build = lambda: direct.conv2d_kernel(  # noqa: E731
                shape_in, integers.shape, dtype, op.stride, op.padding, op.dilation, op.groups,
                epilogue, self.target, input_range=span, prepacked=True)
        else:
            stored = integers.astype(dtype)
            build = lambda: direct.dense_kernel(  # noqa: E731
                shape_in, integers.shape, dtype, epilogue, self.target, input_range=span)
        self.kernel_kinds[op.layer] = f"direct {dtype}"
        self._call(value, symbol, build, [data, np.ascontiguousarray(stored), *extra])

    def _plan_add(self, op: ir.Add) -> None:
        sources = [self._integers(name) for name in op.inputs]
        shape = self.shapes[op.name]
        symbol = f"add{len(sources)}_{_shape_tag(shape)}"
        self._call(op.name, symbol, lambda: glue.add(shape, len(sources), self.target, symbol),
                   sources)

    def _plan_sumpool(self, op: ir.SumPool) -> None:
        source = self._integers(op.input)
        shape = self.shapes[source]
        spatial = shape[2:]
        if op.output_size is not None:
            windows = [glue.adaptive_windows(n, o) for n, o in zip(spatial, op.output_size,
                                                                    strict=True)]
        else:
            windows = [glue.fixed_windows(n, k, s, p, 1, False) for n, k, s, p in
                       zip(spatial, op.kernel, op.stride, op.padding, strict=True)]
        self._pool(op.name, source, windows, "sum")

    def _plan_maxpool(self, op: ir.MaxPool) -> None:
        if any(d != 1 for d in op.dilation):
            raise NotDeployableError(f"{op.name}: dilated max pooling")
        shape = self.shapes[op.input]
        windows = [glue.fixed_windows(n, k, s, p, 1, op.ceil_mode) for n, k, s, p in
                   zip(shape[2:], op.kernel, op.stride, op.padding, strict=True)]
        self._pool(op.name, op.input, windows, "max")

    def _pool(self, value: str, source: str, windows, mode: str) -> None:
        shape = self.shapes[source]
        symbol = f"{mode}pool_{_shape_tag(shape)}_{abs(hash(str(windows))) % 10**8}"
        self._call(value, symbol,
                   lambda: glue.window_pool(shape, windows, mode, self.target, symbol), [source])

    def _plan_reshape(self, op: ir.Reshape) -> None:
        shape_in, shape_out = self.shapes[op.input], self.shapes[op.name]
        symbol = f"reshape_{_shape_tag(shape_in)}_to_{_shape_tag(shape_out)}"
        self._call(op.name, symbol,
                   lambda: glue.reshape(shape_in, shape_out, self.target, symbol), [op.input])

    def _plan_concat(self, op: ir.Concat) -> None:
        shapes = [self.shapes[name] for name in op.inputs]
        dim = op.dim % len(shapes[0])
        symbol = f"concat{dim}_" + "_".join(_shape_tag(s) for s in shapes)
        self._call(op.name, symbol, lambda: glue.concat(shapes, dim, self.target, symbol),
                   list(op.inputs))

    def _plan_dequantize(self, op: ir.Dequantize) -> None:
        fmt = self.graph.values[op.input]
        source = self._integers(op.input)
        shape = self.shapes[source]
        if isinstance(fmt, ir.CodeFormat):
            scale, bias = np.array([fmt.scale]), np.zeros(1)
        else:
            scale, bias = fmt.scale.numpy(), fmt.bias.numpy()
        channels = len(scale)
        symbol = f"dequantize_{_shape_tag(shape)}_{channels}"
        self._call(op.name, symbol,
                   lambda: glue.dequantize(shape, channels, op.low, op.high, self.target, symbol),
                   [source, np.ascontiguousarray(scale.astype("float64")),
                    np.ascontiguousarray(bias.astype("float64"))], dtype="float32")

    # -- building the Relax module ------------------------------------------------------------

    def build(self, input_shape) -> tvm.IRModule:
        bb = relax.BlockBuilder()
        symbols = {}
        for name, func in self.kernels.items():
            symbols[name] = bb.add_func(func.with_attr("global_symbol", name), name)
        arrays = []
        for _, _, args, _, _ in self.calls:
            arrays += [a for a in args if isinstance(a, np.ndarray)]
        self.params = arrays
        for function, returns_all in (("main", False), ("trace", True)):
            x = relax.Var("x", relax.TensorType(tuple(input_shape), "float32"))
            params = [relax.Var(f"p{k}", relax.TensorType(a.shape, str(a.dtype)))
                      for k, a in enumerate(arrays)]
            with bb.function(function, [x, *params]):
                with bb.dataflow():
                    env = {self.graph.inputs[0]: x}
                    next_param = iter(params)
                    for value, symbol, args, shape, dtype in self.calls:
                        inputs = [next(next_param) if isinstance(a, np.ndarray) else env[a]
                                  for a in args]
                        env[value] = bb.emit(relax.call_tir(
                            symbols[symbol], inputs, relax.TensorType(shape, dtype)))
                    if returns_all:
                        out = bb.emit_output(relax.Tuple([env[v] for v in self.traced]))
                    else:
                        out = bb.emit_output(env[self.graph.output])
                bb.emit_func_output(out)
        return bb.get()


def _epilogue(op: ir.Requantize) -> tuple[Epilogue, list[np.ndarray]]:
    rows = op.thresholds.shape[0]
    levels = op.thresholds.shape[1]
    direction = op.direction.numpy().astype("int64")
    if op.fixed_point is not None:
        multiplier, offset, shift = op.fixed_point
        return (Epilogue("fixed_point", levels, rows > 1, shift),
                [multiplier.numpy().astype("int64"), offset.numpy().astype("int64"), direction])
    return (Epilogue("thresholds", levels, rows > 1),
            [op.thresholds.numpy().astype("int64"), direction])


def _inputs(op) -> list[str]:
    if hasattr(op, "inputs"):
        return list(op.inputs)
    return [op.input]


def _identity(levels: torch.Tensor) -> bool:
    return bool(torch.equal(levels, torch.arange(len(levels), dtype=levels.dtype)))


def _shape_tag(shape) -> str:
    return "x".join(str(int(s)) for s in shape) if len(shape) else "s"


def parameter_bytes(params: list[np.ndarray]) -> int:
    return int(sum(a.nbytes for a in params))

