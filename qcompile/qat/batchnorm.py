"""Batch-norm re-estimation: running statistics recomputed for the current weights.

At 2-4 bits a training step can flip weight codes, the batch statistics of the layers after them
jump, and the running statistics (an exponential moving average) trail behind: a model evaluated
with them swings by tens of points of accuracy from one epoch to the next while the same weights
evaluated with batch statistics hold steady (mnist5k, QIL and LSQ at W2A2, benchmarks/RESULTS.md).
Nagel et al. ("Overcoming Oscillations in Quantization-Aware Training", ICML 2022) re-estimate
the statistics from training data with the final weights. With ``train(bn_reestimation=N)`` the
training loop does so at the end of every epoch, before validation and the checkpoint, so that
what is validated, saved and returned carries statistics of its own weights.

Off by default: a fused conv-BN (:mod:`qcompile.fused`) quantizes the folded weight, whose codes
follow the running variance, so re-estimating the statistics moves the codes too; on mnist5k
(QIL W2A2) that made the per-epoch accuracy worse, not steadier. Quantizing a weight that does
not depend on the statistics made it steady but ended lower at W2A2 (benchmarks/RESULTS.md).

Which batch norms: those updating their statistics (a fused conv-BN not frozen, another batch
norm in training mode); after :class:`~qcompile.qat.schedules.FreezeBatchNorm` has frozen them
nothing is re-estimated. The rest of the model runs in eval mode, as validation sees it (hard
quantizers, dropout off). Each statistic becomes the plain average over the batches (momentum
None, as torch does: the mean of the batch means and of the batch variances); under ``torchrun``
each process averages its own equal share of the batches and the statistics are averaged over
processes, which gives what one process would from all those batches.
"""

import itertools
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from qcompile.fused import ConvBatchNorm


def updating_batch_norms(model: nn.Module) -> list[tuple[nn.Module, _BatchNorm]]:
    """``(owner, batch norm)`` of every batch norm that a training forward would update now; the
    owner is the module whose mode decides it (the fused conv-BN, or the batch norm itself)."""
    fused = [m for m in model.modules() if isinstance(m, ConvBatchNorm)]
    inside = {id(m.bn) for m in fused}
    norms = [(m, m.bn) for m in fused
             if m.training and not m.statistics_frozen and m.bn.track_running_stats]
    norms += [(m, m) for m in model.modules()
              if isinstance(m, _BatchNorm) and id(m) not in inside and m.training
              and m.track_running_stats]
    return norms


@torch.no_grad()
def reestimate_batch_norms(model: nn.Module, batches: Iterable[torch.Tensor], examples: int,
                           average: Callable[[list[torch.Tensor]], None] | None = None) -> int:
    """Recompute the running statistics of every updating batch norm from the first whole
    ``batches`` that hold ``examples`` inputs; ``average`` replaces tensors by their mean over
    processes (None: one process). Returns the number of examples used (0: nothing to do)."""
    norms = updating_batch_norms(model)
    if not norms or examples <= 0:
        return 0
    modes = [(module, module.training) for module in model.modules()]
    momenta = [bn.momentum for _, bn in norms]
    seen = 0
    try:
        model.eval()
        for owner, bn in norms:
            owner.training = True
            bn.train()
            bn.reset_running_stats()
            bn.momentum = None
        for inputs in itertools.takewhile(lambda _: seen < examples, batches):
            model(inputs)
            seen += len(inputs)
    finally:
        for module, mode in modes:
            module.training = mode
        for (_, bn), momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
    if average is not None:
        statistics = [bn.running_mean for _, bn in norms] + [bn.running_var for _, bn in norms]
        average(statistics)
    return seen
