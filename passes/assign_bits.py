"""assign-bits: choose each quantizable layer's weight and activation bit-width.

Policies: ``uniform`` (every layer at ``bits``) and ``sensitivity``, chosen when a budget is given
(``budget_size``: fraction of the fp32 weight bytes; ``budget_bops``: fraction of the fp32 bit
operations, MACs x 32 x 32). The sensitivity policy estimates each layer's loss Hessian trace
with Hutchinson's method on calibration batches, multiplies it by the weight perturbation of each
choice in ``bits_choices`` (HAWQ-V2), and picks the assignment of least total sensitivity within
the budget with an exact integer program (HAWQ-V3). The first and last layers are held at
``first_last_bits`` (8 by default; 0 leaves them to the policy). The result is written to each
layer node's ``node.meta["quant"]`` (``weight_bits``, ``act_bits``, and ``sensitivity``), where
``insert-quantizers`` and the per-layer report read it.
"""

import logging

import torch.fx as fx

from qcompile.errors import ConfigError
from qcompile.pipeline import PassContext, register_pass
from qcompile.quant.allocation import allocate_bits
from qcompile.quant.calibration import batches_for
from qcompile.quant.layers import LayerSite, quantizable_layers
from qcompile.quant.sensitivity import hessian_traces, sensitivity_table

log = logging.getLogger("qcompile.passes.assign_bits")


@register_pass("assign-bits")
def assign_bits(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    sites = quantizable_layers(gm)
    if not sites:
        ctx.note("no quantizable layers")
        return gm
    bits = _bit_width(ctx.option("bits", 2), "bits")
    edge = ctx.option("first_last_bits", 8)
    fixed = {} if not edge else {0: _bit_width(edge, "first_last_bits"), len(sites) - 1: edge}
    budget_size, budget_bops = ctx.option("budget_size"), ctx.option("budget_bops")
    if budget_size is None and budget_bops is None:
        chosen = [fixed.get(i, bits) for i in range(len(sites))]
        table = None
        ctx.note(f"uniform: {bits} bits, first/last {edge or bits}")
    else:
        if budget_size is not None and budget_bops is not None:
            raise ConfigError("give one budget: budget_size or budget_bops, not both")
        choices = _choices(ctx.option("bits_choices", "2,3,4,8"))
        batches = batches_for(ctx, int(ctx.option("hessian_examples", 128)), "the Hessian estimate")
        traces = hessian_traces(gm, sites, batches, samples=int(ctx.option("hutchinson_samples", 16)))
        table = sensitivity_table(traces, sites, sorted(set(choices) | set(fixed.values())))
        options = [{b: s for b, s in row.items() if b in choices or fixed.get(i) == b}
                   for i, row in enumerate(table)]
        kind, fraction = ("size", budget_size) if budget_size is not None else ("bops", budget_bops)
        cost, budget = _cost_and_budget(sites, options, kind, _fraction(fraction, kind))
        chosen = allocate_bits(options, cost, budget, fixed)
        used = sum(cost[i][b] for i, b in enumerate(chosen)) / budget * _fraction(fraction, kind)
        ctx.note(f"sensitivity: {kind} {used:.3f} of fp32 (budget {fraction}), bits {chosen}")
    for i, (site, width) in enumerate(zip(sites, chosen)):
        meta = dict(site.node.meta.get("quant", {}), weight_bits=width, act_bits=width)
        if table is not None:
            meta["sensitivity"] = table[i][width]
        site.node.meta["quant"] = meta
        log.info("%s: %d params, %d MACs, %d bits%s", site.name, site.params, site.macs, width,
                 f", sensitivity {table[i][width]:.3g}" if table is not None else "")
    return gm


def _cost_and_budget(sites: list[LayerSite], options, kind: str, fraction: float):
    if kind == "size":
        cost = [{b: site.params * b / 8 for b in row} for site, row in zip(sites, options)]
        return cost, fraction * sum(site.params * 4 for site in sites)
    if any(site.macs == 0 for site in sites):
        raise ConfigError("a BOPs budget needs layer shapes: run with example inputs")
    cost = [{b: site.macs * b * b for b in row} for site, row in zip(sites, options)]
    return cost, fraction * sum(site.macs * 32 * 32 for site in sites)


def _choices(value) -> list[int]:
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        return sorted({_bit_width(int(item), "bits_choices") for item in items})
    except ValueError:
        raise ConfigError(f"bits_choices must be integers like 2,3,4,8; got {value!r}") from None


def _bit_width(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 8:
        raise ConfigError(f"{name} must be an integer from 1 to 8, got {value!r}")
    return value


def _fraction(value, kind: str) -> float:
    if not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"budget_{kind} is a fraction of fp32 in (0, 1], got {value!r}")
    return float(value)
