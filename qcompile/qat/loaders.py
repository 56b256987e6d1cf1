"""The batches the training loop sees, in an order it owns so that a resumed run is exact.

Training data may be a map-style ``Dataset``, a ``DataLoader`` (its dataset, batch size and
collate function are taken; the loop re-wraps them), a list of ``(input, label)`` examples, or an
``(inputs, labels)`` pair of tensors or NumPy arrays (floating-point arrays become torch's default
dtype, float32 unless set otherwise, as NumPy's float64 would not meet a float32 model).
Each epoch's order is a permutation drawn by :class:`~torch.utils.data.DistributedSampler` from a
generator seeded by ``(seed, epoch)``, and the same sampler shards the data across processes under
``torchrun``. Resuming mid-epoch skips the batches already done without loading them.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    Subset,
    TensorDataset,
    default_collate,
)

from qcompile.errors import ConfigError
from qcompile.ir.trace import from_numpy


@dataclass
class Source:
    """A dataset and how to batch it."""

    dataset: Dataset
    batch_size: int
    collate_fn: Callable = default_collate
    num_workers: int = 0
    pin_memory: bool = False

    def __len__(self) -> int:
        return len(self.dataset)


def as_source(data, batch_size: int, what: str = "train_data") -> Source:
    """Read a Dataset, a DataLoader or an ``(inputs, labels)`` tensor pair as a :class:`Source`."""
    if isinstance(data, DataLoader):
        source = Source(data.dataset, data.batch_size or batch_size,
                        data.collate_fn or default_collate, data.num_workers, data.pin_memory)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data):
        if len(data[0]) != len(data[1]):
            raise ConfigError(f"{what}: {len(data[0])} inputs but {len(data[1])} labels")
        source = Source(TensorDataset(data[0], data[1]), batch_size)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, (torch.Tensor, np.ndarray)) for t in data):
        return as_source(tuple(from_numpy(array) for array in data), batch_size, what)
    elif isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        source = Source(data, batch_size)
    elif isinstance(data, (tuple, list)):
        source = Source(data, batch_size)  # examples, as torch's DataLoader takes them
    else:
        raise ConfigError(
            f"{what} must be a map-style Dataset, a DataLoader over one, a list of (input, "
            "label) examples, or an (inputs, labels) pair of tensors or NumPy arrays, not "
            f"{type(data).__name__}")
    if len(source) == 0:
        raise ConfigError(f"{what} is empty")
    if source.batch_size < 1:
        raise ConfigError(f"{what}: batch size must be at least 1, got {source.batch_size}")
    return source


class EpochBatches:
    """Each epoch's batches of training indices for this process.

    A last batch smaller than the rest is dropped when there is at least one full batch: every
    step then sees the same batch size (batch-norm statistics of a tiny tail batch are noise, and
    a batch of one cannot be normalised at all); reshuffling each epoch still visits every example.
    """

    def __init__(self, source: Source, seed: int, world_size: int = 1, rank: int = 0):
        self.source = source
        self.sampler = DistributedSampler(source.dataset, num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed)
        self.seed = seed

    def __len__(self) -> int:
        full, tail = divmod(len(self.sampler), self.source.batch_size)
        return full if full else int(tail > 0)

    def indices(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        size = self.source.batch_size
        return [order[i:i + size] for i in range(0, len(self) * size, size)]

    def loader(self, epoch: int, skip: int = 0) -> DataLoader:
        """Epoch ``epoch``'s batches after the first ``skip``.

        The loader gets its own generator so that creating it draws nothing from the global RNG,
        which a resumed run restores to where the interrupted run stood.
        """
        remaining = self.indices(epoch)[skip:]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return DataLoader(self.source.dataset, batch_sampler=remaining,
                          collate_fn=self.source.collate_fn, num_workers=self.source.num_workers,
                          pin_memory=self.source.pin_memory, generator=generator)


def evaluation_loader(source: Source, world_size: int = 1, rank: int = 0) -> DataLoader:
    """In-order batches of this process's share of ``source`` (every ``world_size``-th example),
    so that sums over processes count each example exactly once."""
    dataset = source.dataset
    if world_size > 1:
        dataset = Subset(dataset, list(range(rank, len(dataset), world_size)))
    return DataLoader(dataset, batch_size=source.batch_size, shuffle=False,
                      collate_fn=source.collate_fn, num_workers=source.num_workers,
                      pin_memory=source.pin_memory, generator=torch.Generator().manual_seed(0))


def split_batch(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(inputs, labels)`` of a collated batch, on ``device``."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ConfigError("each training example must be an (input, label) pair; got a batch of "
                          f"type {type(batch).__name__}")
    inputs, labels = batch[0], batch[1]
    fast = device.type == "cuda"
    return inputs.to(device, non_blocking=fast), labels.to(device, non_blocking=fast)


@torch.no_grad()
def check_examples(model: nn.Module, source: Source, device: torch.device, what: str) -> None:
    """What training would otherwise fail on in its first step, with torch's message and no
    word of which argument: ``source``'s first example that ``model`` does not run on, labels
    that are not class indices, and (for tensors, all of them; else the first) a label beyond
    the model's outputs. A ConfigError naming ``what``; the model runs once, in eval mode, on
    one example, and is left in the mode it was in."""
    inputs, labels = split_batch(source.collate_fn([source.dataset[0]]), device)
    if labels.is_floating_point() or labels.is_complex() or labels.dim() != 1:
        raise ConfigError(f"{what}: labels must be class indices, one integer per example; got "
                          f"{labels.dtype} labels of shape {tuple(labels.shape[1:])} each")
    training = model.training
    try:
        logits = model.eval()(inputs)
    except Exception as error:
        raise ConfigError(f"{what}: the model does not run on its inputs (one of shape "
                          f"{tuple(inputs.shape[1:])}): {type(error).__name__}: {error}") from error
    finally:
        model.train(training)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        return
    dataset = source.dataset
    every = dataset.tensors[1] if isinstance(dataset, TensorDataset) else labels
    low, high = int(every.min()), int(every.max())
    if low < 0 or high >= logits.shape[1]:
        raise ConfigError(f"{what}: labels run from {low} to {high}, and the model has "
                          f"{logits.shape[1]} outputs (classes 0 to {logits.shape[1] - 1})")
