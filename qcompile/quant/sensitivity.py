"""Per-layer quantization sensitivity: Hessian trace times quantization perturbation.

HAWQ-V2 (Dong et al., NeurIPS 2020) ranks layers by ``Omega_i(b) = Tr(H_i) / n_i *
||Q_b(W_i) - W_i||^2``: the average curvature of the loss along layer ``i``'s ``n_i`` weights
times the squared error that quantizing them to ``b`` bits introduces. ``Tr(H_i)`` is estimated
with Hutchinson's method, ``E[v^T H v]`` over Rademacher vectors ``v``, where ``Hv`` is one
double-backward pass; one ``v`` over all layers at once yields every layer's estimate. The loss is
the cross-entropy of the model against its own predictions, so no labels are needed. Away from a
minimum (an untrained model, say) a trace can come out negative; its magnitude is what measures
how far the loss moves under a perturbation, so the table uses ``|Tr(H_i)|``.
"""

from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from qcompile.quant.layers import LayerSite


def hessian_traces(
    gm: fx.GraphModule,
    sites: Sequence[LayerSite],
    batches: Iterable[tuple[torch.Tensor, ...]],
    samples: int = 16,
    seed: int = 0,
) -> list[float]:
    """Hutchinson estimates of the loss Hessian's trace for each site's weight."""
    weights = [_trainable_weight(site) for site in sites]
    modes = {name: m.training for name, m in gm.named_modules()}
    flags = [w.requires_grad for w in weights]
    generator = torch.Generator().manual_seed(seed)
    totals = [0.0] * len(sites)
    count = 0
    gm.eval()
    try:
        for weight in weights:
            weight.requires_grad_(True)
        for inputs in batches:
            grads = _loss_gradients(gm, inputs, weights)
            for _ in range(samples):
                vs = [_rademacher(w, generator) for w in weights]
                hvs = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=True)
                for i, (v, hv) in enumerate(zip(vs, hvs)):
                    totals[i] += float((v * hv).sum())
            count += samples
    finally:
        for weight, flag in zip(weights, flags):
            weight.requires_grad_(flag)
        for name, module in gm.named_modules():
            module.training = modes[name]
    if count == 0:
        raise ValueError("no calibration batches to estimate the Hessian with")
    return [total / count for total in totals]


def _loss_gradients(gm, inputs, weights):
    logits = gm(*inputs)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    logits = logits.reshape(logits.shape[0], -1)
    target = logits.detach().argmax(dim=1)
    loss = F.cross_entropy(logits, target)
    return torch.autograd.grad(loss, weights, create_graph=True)


def _trainable_weight(site: LayerSite) -> torch.Tensor:
    module = site.module
    while hasattr(module, "layer"):
        module = module.layer
    return module.weight


def _rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    bits = torch.randint(0, 2, like.shape, generator=generator)
    return (bits * 2 - 1).to(like.dtype)


def quantization_error(weight: torch.Tensor, bits: int) -> float:
    """``||Q_b(W) - W||^2`` for symmetric per-output-channel uniform quantization (as HAWQ).

    One bit means binary weights ``±mean|W|`` per channel.
    """
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    if bits == 1:
        quantized = w.abs().mean(dim=1, keepdim=True) * torch.where(w >= 0, 1.0, -1.0)
    else:
        levels = 2 ** (bits - 1) - 1
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels
        quantized = torch.round(w / scale).clamp(-levels, levels) * scale
    return float(((quantized - w) ** 2).sum())


def sensitivity_table(
    traces: Sequence[float], sites: Sequence[LayerSite], choices: Sequence[int]
) -> list[dict[int, float]]:
    """``Omega_i(b)`` for every site and bit choice."""
    table = []
    for trace, site in zip(traces, sites):
        weight = site.weight
        curvature = abs(trace) / weight.numel()
        table.append({b: curvature * quantization_error(weight, b) for b in choices})
    return table
