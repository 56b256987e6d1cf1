"""Small models the CLI tests name with ``--arch plugins.models:<Class>``."""

import torch
from torch import nn


class SmallNet(nn.Module):
    """conv-BN-ReLU twice, pooling and a classifier: every layer kind the passes rewrite."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


class Branchy(nn.Module):
    """Python control flow on a tensor value, which fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            return y
        return -y


class WrapsBranchy(nn.Module):
    """A traceable model around an untraceable block: ``--leaf Branchy`` keeps the block whole."""

    def __init__(self):
        super().__init__()
        self.block = Branchy()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))
