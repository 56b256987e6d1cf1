"""estimate-bn: give batch norms that never saw data the statistics of the calibration inputs.

Matches every BatchNorm whose running statistics are still those it was built with (mean 0,
variance 1, no batch tracked): a model that was never trained, or whose state dict carried no
statistics. Its eval-mode output is then the raw pre-normalization value while training
normalizes with batch statistics, so everything calibrated in eval mode after it (the weight
quantizers of the layers ``fold-bn`` folds it into, which scale with ``1 / sqrt(running_var)``,
and the activation quantizers that follow) is calibrated on the wrong scale, and the first
training steps clip nearly everything. Measured: torchvision's untrained ResNet-18 on digits,
QAT at 8 bits, stayed at chance (loss 2.303 after 2 epochs, LSQ and QIL alike) while the float
model reached 94.7%; with its statistics estimated from the 64 calibration examples, 93.9% (QIL)
and 81.9% (LSQ; 90.6% with the paper's step rule, see ``LEAST_SQUARES_BITS`` in
:mod:`qcompile.quant.lsq`).

The statistics are those of the calibration batches (``calib_data``, the first
``calib_examples``, default 64, put together as one batch where their shapes agree): each
matched batch norm runs in training mode with a cumulative average (``momentum=None``) and gets
its momentum and mode back afterwards; the model's other modules run in eval mode. Trained
statistics are never touched, nor is anything without calibration data (the example inputs are
one example, too few to estimate a variance) or with too little of it for torch to normalize
(one value per channel): the pass record then says which batch norms kept their initial
statistics and why.
"""

import torch
from torch import fx, nn

from qcompile.pipeline import PassContext, register_pass
from qcompile.quant.calibration import CALIB_EXAMPLES, calibration_batches


@register_pass("estimate-bn")
def estimate_bn(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    fresh = {name: module for name, module in gm.named_modules() if never_saw_data(module)}
    if not fresh:
        return gm
    listed = ", ".join(list(fresh)[:3]) + (f" and {len(fresh) - 3} more" if len(fresh) > 3 else "")
    inputs = None if ctx.example_inputs is None else len(ctx.example_inputs)
    batches = calibration_batches(ctx.option("calib_data"),
                                  int(ctx.option("calib_examples", CALIB_EXAMPLES)), inputs)
    if not batches:
        ctx.note(f"{len(fresh)} batch norm(s) never saw data ({listed}) and keep their initial "
                 "statistics: give calibration data to estimate them")
        return gm
    try:
        batches = [tuple(torch.cat(parts) for parts in zip(*batches))]
    except RuntimeError:
        pass  # inputs of different shapes: the average runs over the batches one by one
    examples = sum(len(batch[0]) for batch in batches)
    problem = _estimate(gm, list(fresh.values()), batches)
    if problem is not None:
        ctx.note(f"{len(fresh)} batch norm(s) never saw data ({listed}) and keep their initial "
                 f"statistics: {examples} calibration example(s) cannot estimate them "
                 f"({problem}); give more calibration data")
    else:
        ctx.note(f"estimated the statistics of {len(fresh)} batch norm(s) that never saw data "
                 f"({listed}) from {examples} calibration examples")
    return gm


def never_saw_data(module: nn.Module) -> bool:
    """A batch norm tracking running statistics that still holds the ones it was built with."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.track_running_stats:
        return False
    return (int(module.num_batches_tracked) == 0 and bool((module.running_mean == 0).all())
            and bool((module.running_var == 1).all()))


@torch.no_grad()
def _estimate(gm: fx.GraphModule, norms: list[nn.Module], batches: list) -> str | None:
    """Run ``batches`` through ``gm`` with ``norms`` averaging their batch statistics; on
    torch's refusal (one value per channel), every norm back at its initial statistics and the
    reason returned."""
    modes = {module: module.training for module in gm.modules()}
    momenta = {norm: norm.momentum for norm in norms}
    gm.eval()
    try:
        for norm in norms:
            norm.momentum = None
            norm.train()
        for batch in batches:
            gm(*batch)
    except ValueError as error:
        for norm in norms:
            norm.reset_running_stats()
        return str(error)
    finally:
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    return None
