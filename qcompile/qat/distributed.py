"""Data-parallel training under ``torchrun``: process group, DDP wrapping, collectives.

When ``torchrun`` starts the script (``WORLD_SIZE`` > 1 in the environment), the loop joins the
process group it describes (gloo on CPU, NCCL on CUDA), wraps the model in
:class:`~torch.nn.parallel.DistributedDataParallel` and shards the data with
:class:`~torch.utils.data.DistributedSampler`. Everything here is a thin layer over
``torch.distributed``; a single process gets the same interface with every collective a no-op.
"""

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qcompile.errors import ConfigError


@dataclass
class Distributed:
    """This process's place in the run: world size, rank, and the device it trains on."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DDP (buffers such as BN statistics and quantizer state broadcast from rank
        0 before each forward); unused parameters are allowed, since schedules may switch
        quantizers off for a step."""
        if not self.enabled:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=True,
                                       find_unused_parameters=True)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums of ``values`` over every process (the values themselves alone)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each of ``tensors`` (in place) by its element-wise mean over every process."""
        if not self.enabled or not tensors:
            return
        flat = torch.cat([t.reshape(-1).double() for t in tensors]).to(self._collective_device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            tensor.copy_(part.reshape(tensor.shape))

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on any of them."""
        if not self.enabled:
            return flag
        return self.all_reduce_sum([float(flag)])[0] > 0

    def all_gather(self, obj) -> list:
        """``obj`` from every process, in rank order."""
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers to every process, as DDP does before each forward: after the
        last step each rank's batch-norm statistics hold its own batch, and evaluation and the
        final model must use one set."""
        if self.enabled:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if this run created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    @property
    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def setup(device: str | torch.device | None = None) -> Distributed:
    """Join the ``torchrun`` process group when there is one, and pick this process's device.

    ``device=None`` picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _device(device, local_rank)
    if world_size <= 1:
        return Distributed(device=chosen)
    owns_group = False
    if not dist.is_initialized():
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
        owns_group = True
    return Distributed(dist.get_world_size(), dist.get_rank(), local_rank, chosen, owns_group)


def _device(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device {device!r} is not a torch device ({error}); "
                          "use 'cpu', 'cuda' or 'cuda:N'") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this machine has no usable CUDA GPU (torch "
                          f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
                          "train on device='cpu'")
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return chosen
