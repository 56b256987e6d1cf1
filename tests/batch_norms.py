"""Batch norms with statistics far from the identity, for tests of folding and integer lowering."""

import torch
from torch import nn


def randomize_batch_norms(model: nn.Module, seed: int) -> nn.Module:
    """Statistics and affine parameters far from the identity, negative scales included."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
            module.weight.data.copy_((torch.rand(c, generator=gen) + 0.5)
                                     * torch.where(torch.rand(c, generator=gen) < 0.1, -1, 1))
            module.bias.data.copy_(torch.rand(c, generator=gen) - 0.5)
    return model


def with_batch_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give an untrained model's batch norms the statistics of ``x``, as training would.

    With the default statistics (mean 0, variance 1) an untrained torchvision model's activations
    shrink layer by layer until its output is constant, and no gradient is left to check.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()
