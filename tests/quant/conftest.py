"""Shared helpers for the quantizer tests."""

import pytest
import torch
import torch.nn.functional as F

from qcompile.quant import make_quantizer


def train_quantized_linear(method: str, bits: int, steps: int = 40) -> list[float]:
    """Fit a quantized linear layer to a float teacher for a few Adam steps; the losses seen.

    Weights per output channel (signed), inputs after a ReLU (unsigned): the common case of a layer
    in a quantized network. A learnable output gain lets weight quantizers that normalize (DoReFa)
    fit the teacher's scale.
    """
    gen = torch.Generator().manual_seed(bits)
    teacher = torch.randn(4, 8, generator=gen) * 0.5
    inputs = torch.rand(128, 8, generator=gen)
    targets = inputs @ teacher.t()
    weight = torch.nn.Parameter(teacher + 0.3 * torch.randn(4, 8, generator=gen))
    gain = torch.nn.Parameter(torch.ones(()))
    qw = make_quantizer(method, "weight", bits, signed=True, per_channel=True, channels=4)
    qa = make_quantizer(method, "activation", bits, signed=False)
    qw.initialize(weight.detach())
    qa.initialize(inputs)
    params = [weight, gain, *qw.parameters(), *qa.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.mse_loss(gain * F.linear(qa(inputs), qw(weight)), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def train_tiny():
    return train_quantized_linear
