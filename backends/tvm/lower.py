"""Lower an :class:`~qcompile.integer_ir.IntegerGraph` to a Relax module of scheduled kernels.

Every op becomes one ``relax.call_tir`` of a pre-scheduled PrimFunc from
:mod:`qcompile.backends.tvm.kernels`; nothing is left for TVM's default pipeline to (not)
schedule. On a CPU with AMX-INT8, convs whose input codes stand for themselves (``0..2^b-1``,
b <= 8) and whose weights fit int8 run on AMX (:mod:`.kernels.amx`); elsewhere conv and linear
layers run bit-serial (:mod:`.kernels.bitserial`) when both operands are low-bit codes that stand
for themselves (activations ``0..2^b-1``, weights in an unsigned, two's-complement or bipolar
form, bits <= 4, groups = 1); the rest run direct (:mod:`.kernels.direct`: 8-bit layers,
depthwise convs, learned weight tables). A layer whose accumulator only feeds one requantization
gets it as a fused epilogue, so the accumulator never reaches memory. Values between ops are
int32 tensors of codes (or accumulators), except codes that only bit-serial convs read, stored
as packed bit planes (by the conv whose epilogue computes them or by their requantization
kernel), and codes that only AMX convs read, stored by the AMX conv that computes them in its
readers' padded channels-last layout; AMX convs read any other input through one packing kernel
per value.

Between layers the lowering moves less data than the ops literally say
(:mod:`.glue_plan`): affine codes reach their consumers as codes, residual adds are folded into
their readers, small-range requantizations are tables, and a max pool after a requantization
pools the accumulator first.

The module has two functions of the same program (:mod:`.relax_module`): ``main(x, *params)
-> logits`` and ``trace(x, *params) -> (value, ...)``, every value by name
(:data:`Lowered.traced`), which ``verify`` compares with the simulated model; values ``main``
computes another way are computed in ``trace`` only, so every value of the program is still
checked. Parameters (packed weight words, thresholds, scales) are function inputs, not
constants, so the artifact stores them once, packed.
"""

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import tvm

from qcompile import integer_ir as ir
from qcompile.backends.reference import run as reference_run
from qcompile.backends.tvm import glue_plan
from qcompile.backends.tvm.kernels import amx, bitserial_packed, glue, pooling
from qcompile.backends.tvm.kernels.epilogue import Epilogue
from qcompile.backends.tvm.kernels.glue import Terms
from qcompile.backends.tvm.lower_layers import plan_layer, shape_tag
from qcompile.backends.tvm.relax_module import Call, build_module
from qcompile.backends.tvm.stored_params import AmxWeight
from qcompile.errors import NotDeployableError

ONE = Terms((1,))


@dataclass
class Lowered:
    module: tvm.IRModule
    params: list[np.ndarray]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    traced: list[str]
    kernels: dict[str, str] = field(default_factory=dict)
    program: list[tuple[str, str]] = field(default_factory=list)
    """``main``'s kernel calls in order: (the value a call computes, the kernel's symbol)."""
    stored: dict[int, AmxWeight] = field(default_factory=dict)
    """Parameters (by position) the artifact stores in a smaller form
    (:mod:`.stored_params`)."""


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
    program = [(call.value, call.symbol) for call in builder.calls if not call.trace_only]
    stored = {k: builder.stored[id(a)] for k, a in enumerate(builder.params)
              if id(a) in builder.stored}
    return Lowered(module, builder.params, tuple(input_shape), shapes[graph.output],
                   builder.traced, builder.kernel_kinds, program, stored)


class _Builder:
    def __init__(self, graph: ir.IntegerGraph, shapes: dict, target):
        self.graph = graph
        self.shapes = shapes
        self.target = target
        self.params: list[np.ndarray] = []
        self.kernels: dict[str, tvm.tirx.PrimFunc] = {}
        self.kernel_kinds: dict[str, str] = {}
        self.fused: dict[str, ir.Requantize] = {}
        self.traced: list[str] = []
        self.calls: list[Call] = []
        self.folded: dict[str, tuple[list[str], Terms]] = {}
        self.pooled_first: dict[str, ir.MaxPool] = {}
        self.pooled: dict[tuple, str] = {}
        self.packed: set[str] = set()
        self.stored: dict[int, AmxWeight] = {}

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
        self.pooled_first = glue_plan.pooled_first(self.graph, readers, self.fused)
        self.packed = {name for name, layer in self.fused.items()
                       if glue_plan.passes_packed(name, layer, readers, self.graph,
                                                 self.shapes, self.target)}
        self.readers = readers
        self.amx_layouts = {}
        for name in readers:
            layout = glue_plan.amx_layout(name, readers, self.graph, self.shapes, self.target)
            if layout is not None:
                self.amx_layouts[name] = layout
        self.amx_only = {name for name, layer in self.fused.items()
                         if glue_plan.writes_amx_layout(name, layer, readers, self.graph,
                                                        self.target)}
        for op in self.graph.ops:
            if isinstance(op, (ir.Conv, ir.Linear)) and any(
                    r is op for r in self.fused.values()):
                continue
            getattr(self, f"_plan_{type(op).__name__.lower()}")(op)

    def call(self, value: str, symbol: str, func, args: list, dtype: str = "int32",
             trace_only: bool = False, traced: bool = True) -> None:
        """Record ``value = func(*args)``; ``args`` are value names or parameter arrays."""
        if symbol not in self.kernels:
            self.kernels[symbol] = func() if callable(func) else func
        self.calls.append(Call(value, symbol, args, self.shapes[value], dtype, trace_only))
        if traced:
            self.traced.append(value)

    def emit_packed(self, value: str, bits: int, emit) -> None:
        """``emit(name)`` computes ``value`` as packed planes under ``name``; the trace unpacks
        them to the int32 codes every other value is traced as."""
        packed = f"{value}:packed"
        shape = self.shapes[value]
        self.shapes[packed] = bitserial_packed.packed_shape(shape, bits, self.target)
        emit(packed)
        symbol = f"unpack_{shape_tag(shape)}_b{bits}"
        self.call(value, symbol, lambda: bitserial_packed.unpack_codes(shape, bits, self.target),
                  [packed], trace_only=True)

    def emit_amx_layout(self, value: str, emit) -> None:
        """``emit(name)`` computes ``value`` in its AMX layout under ``name``; the trace unpacks
        it to the int32 codes every other value is traced as."""
        layout, stored = self.amx_layouts[value], f"{value}:amx"
        self.shapes[stored] = layout.shape
        emit(stored)
        symbol = f"amx_unpack_{layout.tag}"
        self.call(value, symbol, lambda: amx.unpack_kernel(layout, symbol), [stored],
                  trace_only=True)

    def amx_input(self, value: str) -> str:
        """The value holding ``value``'s codes in its AMX layout, packed from its int32 codes
        (once, for every AMX reader) unless its layer stores them only that way."""
        stored = f"{value}:amx"
        if stored not in self.shapes:
            layout = self.amx_layouts[value]
            self.shapes[stored] = layout.shape
            symbol = f"amx_pack_{layout.tag}"
            source = self.materialized(value)
            self.call(stored, symbol,
                      lambda: amx.pack_kernel(self.shapes[source], layout, symbol), [source],
                      "uint8", traced=False)
        return stored

    def _integers(self, name: str) -> tuple[list[str], Terms]:
        """The values and terms giving the integers ``name`` stands for: codes with affine
        levels as they are, a folded add as its inputs' terms, a lookup for tabled levels."""
        if name in self.folded:
            return self.folded[name]
        fmt = self.graph.values.get(name)
        if not isinstance(fmt, ir.CodeFormat):
            return [name], ONE
        affine = glue_plan.affine_levels(fmt.levels)
        if affine is not None:
            return [name], Terms((affine[0],), affine[1])
        value = f"{name}:integers"
        shape = self.shapes[name]
        self.shapes[value] = shape
        symbol = f"lookup_{shape_tag(shape)}_{len(fmt.levels)}"
        self.call(value, symbol,
                  lambda: glue.lookup(shape, len(fmt.levels), self.target, symbol),
                  [name, np.ascontiguousarray(fmt.levels.numpy().astype("int32"))])
        return [value], ONE

    def materialized(self, name: str) -> str:
        """A value holding the integers ``name`` stands for (for kernels that read one)."""
        sources, terms = self._integers(name)
        if terms == ONE:
            return sources[0]
        value = f"{name}:integers"
        self.shapes[value] = shape = self.shapes[name]
        self._emit_add(value, sources, terms, shape)
        return value

    def _emit_add(self, value: str, sources: list[str], terms: Terms, shape,
                  trace_only: bool = False) -> None:
        symbol = f"add{len(sources)}_{shape_tag(shape)}{terms.tag}"
        self.call(value, symbol, lambda: glue.add(shape, terms, self.target, symbol), sources,
                  trace_only=trace_only)

    def _plan_quantize(self, op: ir.Quantize) -> None:
        spec, shape = op.spec, self.shapes[op.input]
        if spec.scale.numel() > 1:
            raise NotDeployableError(f"{op.name}: per-channel input quantization")
        if spec.thresholds is None:
            scale, zero = float(spec.scale.reshape(-1)[0]), float(spec.zero_point.reshape(-1)[0])
            offset = glue_plan.integers_only(op.name, self.readers, self.graph, self.target)
            first = int(spec.codes[0])
            self._quantize_affine(op, op.name, scale, zero, first, trace_only=offset is not None)
            if offset is not None:
                value = f"{op.name}:integers"
                self.shapes[value] = shape
                self._quantize_affine(op, value, scale, zero, first - offset)
                self.folded[op.name] = ([value], ONE)
            return
        thresholds = np.ascontiguousarray(spec.thresholds.double().reshape(-1).numpy())
        count, ordered = len(thresholds), bool((np.diff(thresholds) >= 0).all())
        line = glue.threshold_line(thresholds)
        form = f"l{abs(hash(line)) % 10**8}" if line else "o" * ordered
        symbol = f"quantize_t{count}{form}_{shape_tag(shape)}"
        self.call(op.name, symbol,
                  lambda: glue.quantize_thresholds(shape, count, op.low, op.high, self.target,
                                                   symbol, ordered, line),
                  [op.input, thresholds])

    def _quantize_affine(self, op: ir.Quantize, value: str, scale: float, zero: float,
                         first: int, trace_only: bool = False) -> None:
        """``value`` = the input's codes ``q - first`` (``q`` the quantized integer); a
        ``first`` lowered by ``b`` stores the integers ``u + b`` instead."""
        shape, spec = self.shapes[op.input], op.spec
        args = (scale, zero, spec.qmin, spec.qmax, first, op.low, op.high)
        symbol = f"quantize_{shape_tag(shape)}_{abs(hash(args)) % 10**8}"
        self.call(value, symbol, lambda: glue.quantize_affine(shape, *args, self.target, symbol),
                  [op.input], trace_only=trace_only)

    def _plan_requantize(self, op: ir.Requantize) -> None:
        epilogue, extra = _epilogue(op)
        layer = self.fused.get(op.name)
        if layer is not None:
            self._plan_layer(layer, op.name, epilogue, extra)
            return
        pool = self.pooled_first.get(op.name)
        if pool is None:
            self._requantize(op.name, op, *self._integers(op.input), epilogue, extra)
            return
        self._requantize(op.name, op, [op.input], ONE, epilogue, extra, trace_only=True)
        pooled = self._max_pooled(op.input, pool, op.direction)
        rising = replace(op, direction=torch.ones_like(op.direction))
        self._requantize(pool.name, rising, [pooled], ONE, *_epilogue(rising))

    def _requantize(self, value: str, op: ir.Requantize, sources: list[str], terms: Terms,
                    epilogue: Epilogue, extra: list, trace_only: bool = False) -> None:
        """A requantization kernel storing int32 codes, or the packed planes or AMX layout its
        readers take when they all take one."""
        shape = self.shapes[value]
        packs = not trace_only and glue_plan.reads_packed(value, self.readers, self.graph,
                                                          self.shapes, self.target)
        bits = self.graph.values[value].bits if packs else 0
        to_amx = None if trace_only or not glue_plan.reads_amx_layout(
            value, self.readers, self.graph, self.target) else self.amx_layouts[value]
        layout = f"_po{bits}" if bits else f"_to_{to_amx.tag}" if to_amx else ""
        table = glue_plan.staircase_table(op, self.graph.values.get(op.input))
        if table is not None:
            low, codes = table
            symbol = (f"requantize_table{shape_tag(codes.shape)}{codes.dtype}_"
                      f"{shape_tag(shape)}{terms.tag}_l{low}{layout}").replace("-", "m")
            build = lambda: glue.requantize_table(  # noqa: E731
                shape, terms, low, codes.shape, str(codes.dtype), self.target, symbol, bits,
                to_amx)
            args = [*sources, codes]
        else:
            channels = shape[1] if len(shape) > 1 else 1
            symbol = f"requantize_{epilogue.tag}_{shape_tag(shape)}{terms.tag}{layout}"
            build = lambda: glue.requantize(  # noqa: E731
                shape, epilogue, channels, self.target, symbol, terms, bits, to_amx)
            args = [*sources, *extra]
        if to_amx is not None:
            self.emit_amx_layout(value, lambda stored: self.call(
                stored, symbol, build, args, "uint8", traced=False))
            return
        if not bits:
            self.call(value, symbol, build, args, trace_only=trace_only)
            return
        self.packed.add(value)
        self.emit_packed(value, bits, lambda packed: self.call(
            packed, symbol, build, args, bitserial_packed.packed_dtype(self.target),
            traced=False))

    def _plan_conv(self, op: ir.Conv) -> None:
        self._plan_layer(op, op.name, Epilogue(), [])

    _plan_linear = _plan_conv

    def _plan_layer(self, op, value: str, epilogue: Epilogue, extra: list) -> None:
        plan_layer(self, op, value, epilogue, extra)

    def _plan_add(self, op: ir.Add) -> None:
        sources, terms = [], Terms(())
        for name in op.inputs:
            more, extra = self._integers(name)
            sources, terms = sources + more, terms + extra
        fold = glue_plan.folds_add(op, len(sources), self.readers.get(op.name, []), self.graph,
                                   self.pooled_first)
        if fold:
            self.folded[op.name] = (sources, terms)
        self._emit_add(op.name, sources, terms, self.shapes[op.name], trace_only=fold)

    def _plan_sumpool(self, op: ir.SumPool) -> None:
        sources, terms = self._integers(op.input)
        if len(sources) > 1:
            sources, terms = [self.materialized(op.input)], ONE
        shape = self.shapes[sources[0]]
        if op.output_size is None:
            self._fixed_pool(op.name, sources[0], op.kernel, op.stride, op.padding, False, "sum",
                             terms)
            return
        windows = [pooling.adaptive_windows(n, o)
                   for n, o in zip(shape[2:], op.output_size, strict=True)]
        tag = "_".join(shape_tag((w.count, *w.start, *w.stop)) for w in windows)
        symbol = f"sumpool_{shape_tag(shape)}_{tag}{terms.tag}"
        self.call(op.name, symbol,
                  lambda: pooling.window_pool(shape, windows, "sum", self.target, symbol, terms),
                  sources)

    def _plan_maxpool(self, op: ir.MaxPool) -> None:
        if any(d != 1 for d in op.dilation):
            raise NotDeployableError(f"{op.name}: dilated max pooling")
        if op.input in self.pooled_first:
            return
        self._fixed_pool(op.name, op.input, op.kernel, op.stride, op.padding, op.ceil_mode,
                         "max", ONE)

    def _max_pooled(self, source: str, op: ir.MaxPool, direction: torch.Tensor) -> str:
        """The value ``op``'s max pool of ``direction * source`` (computed once)."""
        signs = tuple(direction.reshape(-1).tolist())
        key = (source, op.kernel, op.stride, op.padding, op.ceil_mode, signs)
        if key not in self.pooled:
            value = self.pooled[key] = f"{source}:maxpool{len(self.pooled)}"
            self.shapes[value] = self.shapes[op.name]
            signed = any(s < 0 for s in signs)
            sign = np.ascontiguousarray(np.broadcast_to(
                np.array(signs, dtype="int32"), (self.shapes[source][1],)))
            self._fixed_pool(value, source, op.kernel, op.stride, op.padding, op.ceil_mode,
                             "max", ONE, [sign] if signed else [])
        return self.pooled[key]

    def _fixed_pool(self, value: str, source: str, kernel, stride, padding, ceil_mode: bool,
                    mode: str, terms: Terms, sign: list | None = None) -> None:
        shape = self.shapes[source]
        counts = tuple(pooling.fixed_windows(n, k, s, p, 1, ceil_mode).count
                       for n, k, s, p in zip(shape[2:], kernel, stride, padding, strict=True))
        symbol = (f"{mode}pool_{shape_tag(shape)}_k{shape_tag(kernel)}s{shape_tag(stride)}"
                  f"p{shape_tag(padding)}o{shape_tag(counts)}{terms.tag}"
                  f"{'_signed' if sign else ''}")
        self.call(value, symbol,
                  lambda: pooling.fixed_pool(shape, kernel, stride, padding, counts, mode,
                                             self.target, symbol, terms, bool(sign)),
                  [source, *(sign or [])])

    def _plan_reshape(self, op: ir.Reshape) -> None:
        shape_in, shape_out = self.shapes[op.input], self.shapes[op.name]
        symbol = f"reshape_{shape_tag(shape_in)}_to_{shape_tag(shape_out)}"
        self.call(op.name, symbol,
                  lambda: glue.reshape(shape_in, shape_out, self.target, symbol), [op.input])

    def _plan_concat(self, op: ir.Concat) -> None:
        shapes = [self.shapes[name] for name in op.inputs]
        dim = op.dim % len(shapes[0])
        symbol = f"concat{dim}_" + "_".join(shape_tag(s) for s in shapes)
        self.call(op.name, symbol, lambda: glue.concat(shapes, dim, self.target, symbol),
                  list(op.inputs))

    def _plan_dequantize(self, op: ir.Dequantize) -> None:
        fmt = self.graph.values[op.input]
        sources, terms = self._integers(op.input)
        shape = self.shapes[sources[0]]
        if isinstance(fmt, ir.CodeFormat):
            scale, bias = np.array([fmt.scale]), np.zeros(1)
        else:
            scale, bias = fmt.scale.numpy(), fmt.bias.numpy()
        channels = len(scale)
        symbol = f"dequantize_{shape_tag(shape)}_{channels}{terms.tag}"
        self.call(op.name, symbol,
                  lambda: glue.dequantize(shape, channels, op.low, op.high, self.target, symbol,
                                          terms),
                  [*sources, np.ascontiguousarray(scale.astype("float64")),
                   np.ascontiguousarray(bias.astype("float64"))], dtype="float32")

    # -- building the Relax module ------------------------------------------------------------

    def build(self, input_shape) -> tvm.IRModule:
        module, self.params = build_module(self.kernels, self.calls, self.traced,
                                           self.graph.inputs[0], self.graph.output, input_shape)
        return module


def _epilogue(op: ir.Requantize) -> tuple[Epilogue, list[np.ndarray]]:
    rows = op.thresholds.shape[0]
    levels = op.thresholds.shape[1]
    direction = op.direction.numpy().astype("int64")
    if op.fixed_point is not None:
        form = op.fixed_point
        floor = [] if form.start is None else [form.start.numpy().astype("int64"),
                                                form.floor.numpy().astype("int64")]
        return (Epilogue("fixed_point", levels, rows > 1, form.shift, form.start is not None),
                [form.multiplier.numpy().astype("int64"), form.offset.numpy().astype("int64"),
                 direction, *floor])
    thresholds = op.thresholds.numpy()
    info = np.iinfo(np.int32)
    table = "int32" if info.min <= thresholds.min() and thresholds.max() <= info.max else "int64"
    return (Epilogue("thresholds", levels, rows > 1, table=table),
            [thresholds.astype(table), direction])


def _inputs(op) -> list[str]:
    if hasattr(op, "inputs"):
        return list(op.inputs)
    return [op.input]


def parameter_bytes(params: list[np.ndarray]) -> int:
    return int(sum(a.nbytes for a in params))

