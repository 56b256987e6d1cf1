"""The per-layer report: shapes, parameters, MACs and quantization settings of each layer.

A *layer* is a ``call_module`` node whose module is a Conv1d/Conv2d/Linear or any module holding
a ``weight`` tensor, or a wrapper that keeps such a module as ``.layer`` (the fused conv-BN and
quantized layers later passes put in the graph), shown as ``Wrapper(Conv2d)``. Shapes come from shape propagation (``node.meta["tensor_meta"]``); quantization settings
from ``node.meta["quant"]`` (keys ``method``, ``weight_bits``, ``act_bits``), which the
quantization passes fill in.
"""

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from qcompile.ir.shapes import output_shape
from qcompile.ir.trace import QUANTIZABLE_LAYERS
from qcompile.quant.layers import layer_macs

Shape = tuple[int, ...]
FP32_BYTES = 4


@dataclass(frozen=True)
class LayerRow:
    """One layer of the report. ``None`` means the graph does not record that field."""

    path: str
    layer_type: str
    input_shape: Shape | None
    output_shape: Shape | None
    params: int
    macs: int | None
    method: str | None = None
    weight_bits: int | None = None
    act_bits: int | None = None
    sensitivity: float | None = None

    @property
    def weight_bytes(self) -> float:
        """Bytes of the layer's parameters at its weight bit-width (fp32 when not quantized)."""
        return self.params * (self.weight_bits or 32) / 8


def layer_report(gm: fx.GraphModule) -> list[LayerRow]:
    """One row per layer of ``gm``, in graph order."""
    modules = dict(gm.named_modules())
    rows = []
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        weighted = _weighted_layer(module) if module is not None else None
        if weighted is None:
            continue
        first_input = node.args[0] if node.args else None
        out_shape = output_shape(node)
        quant = node.meta.get("quant", {})
        rows.append(
            LayerRow(
                path=str(node.target),
                layer_type=_type_name(module, weighted),
                input_shape=output_shape(first_input) if isinstance(first_input, fx.Node) else None,
                output_shape=out_shape,
                params=sum(p.numel() for p in weighted.parameters(recurse=False)),
                macs=layer_macs(weighted, out_shape),
                method=quant.get("method"),
                weight_bits=quant.get("weight_bits"),
                act_bits=quant.get("act_bits"),
                sensitivity=quant.get("sensitivity"),
            )
        )
    return rows


def _weighted_layer(module: nn.Module) -> nn.Module | None:
    """The module holding the layer's weight: ``module`` itself, or the layer a wrapper keeps
    as ``.layer`` (followed through nested wrappers); None if ``module`` is no layer."""
    while not isinstance(module, QUANTIZABLE_LAYERS):
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            return module
        module = getattr(module, "layer", None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _type_name(module: nn.Module, weighted: nn.Module) -> str:
    if module is weighted:
        return type(module).__name__
    return f"{type(module).__name__}({type(weighted).__name__})"


_COLUMNS = ("layer", "type", "input", "output", "params", "MACs", "method", "w bits", "a bits",
            "sensitivity", "bytes")
_RIGHT_ALIGNED = {"params", "MACs", "w bits", "a bits", "sensitivity", "bytes"}


def format_table(rows: list[LayerRow]) -> str:
    """An aligned text table of ``rows`` with a total line (params, MACs, fp32 bytes)."""
    cells = [_COLUMNS] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    lines = [_join(line, widths) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    params = sum(row.params for row in rows)
    macs = sum(row.macs or 0 for row in rows)
    fp32 = params * FP32_BYTES
    total = f"total: {len(rows)} layers, {params:,} params, {macs:,} MACs, {_human_bytes(fp32)} as fp32"
    if any(row.weight_bits for row in rows):
        packed = sum(row.weight_bytes for row in rows)
        total += (f", {_human_bytes(round(packed))} at the assigned bits "
                  f"({size_ratio(packed, fp32)})")
    lines.append(total)
    return "\n".join(lines)


def _cells(row: LayerRow) -> tuple[str, ...]:
    return (
        row.path,
        row.layer_type,
        _shape(row.input_shape),
        _shape(row.output_shape),
        f"{row.params:,}",
        _or_dash(None if row.macs is None else f"{row.macs:,}"),
        _or_dash(row.method),
        _or_dash(row.weight_bits),
        _or_dash(row.act_bits),
        _or_dash(None if row.sensitivity is None else f"{row.sensitivity:.3g}"),
        _human_bytes(round(row.weight_bytes)),
    )


def _join(cells: tuple[str, ...], widths: list[int]) -> str:
    padded = [
        cell.rjust(width) if column in _RIGHT_ALIGNED else cell.ljust(width)
        for cell, width, column in zip(cells, widths, _COLUMNS)
    ]
    return "  ".join(padded).rstrip()


def _shape(shape: Shape | None) -> str:
    return "-" if shape is None else "x".join(str(size) for size in shape)


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def _human_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    size = count / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def size_ratio(size: float, reference: float) -> str:
    """``"12.2x smaller"`` (or ``"1.2x larger"``) for ``size`` bytes against ``reference``."""
    if size <= reference:
        return f"{reference / max(size, 1):.1f}x smaller"
    return f"{size / max(reference, 1):.1f}x larger"
