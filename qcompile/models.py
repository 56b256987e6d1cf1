"""Small models built in code, for the demo, the tests and the benchmarks (no downloaded weights)."""

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks, 2x2 average pooling and a linear classifier.

    Sized for 1x28x28 MNIST (works on any HxW >= 8); about 26k parameters.
    """

    def __init__(self, in_channels: int = 1, classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            _block(in_channels, width, stride=1),
            _block(width, 2 * width, stride=2),
            _block(2 * width, 4 * width, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Linear(4 * width * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )
