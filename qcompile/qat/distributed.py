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
from torch import fx, nn
from torch.nn.parallel import DistributedDataParallel

from qcompile.errors import ConfigError

OWN_MODULES = ("torch.nn.", "qcompile.")
"""Where the modules :func:`every_parameter_used` trusts to use all their parameters live."""


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

    def wrap(self, model: nn.Module, unused_parameters: bool = True) -> nn.Module:
        """``model`` in DDP (buffers such as BN statistics and quantizer state broadcast from rank
        0 before each forward). ``unused_parameters``: whether a step may leave some of its
        parameters out of the loss (a schedule that switches quantizers off; see
        :func:`every_parameter_used`). DDP then looks for them after every backward pass, at
        the cost of a walk over the autograd graph, and warns once on every process when it
        finds none; without it, a parameter left out would stall the gradient averaging."""
        if not self.enabled:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=True,
                                       find_unused_parameters=unused_parameters)

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
        self._broadcast(model.buffers())

    def broadcast_state(self, model: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every process."""
        self._broadcast([*model.parameters(), *model.buffers()])

    def _broadcast(self, tensors) -> None:
        if self.enabled:
            for tensor in tensors:
                dist.broadcast(tensor.data, src=0)

    def close(self) -> None:
        """Leave the process group if this run created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    @property
    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def every_parameter_used(model: nn.Module) -> bool:
    """Whether every trainable parameter of ``model`` enters its output, as far as its graph
    tells without running it: ``model`` is an fx graph; each trainable parameter belongs to a
    module that a node on the way to the output calls, or is an attribute such a node reads;
    every module called is torch's or qcompile's own, whose forward passes use all their
    parameters (one of the user's may skip some), and no quantizer is switched off
    (``enabled``). False when it cannot tell."""
    if not isinstance(model, fx.GraphModule):
        return False
    output = next(node for node in reversed(model.graph.nodes) if node.op == "output")
    live = {output}
    pending = [output]
    while pending:
        for node in pending.pop().all_input_nodes:
            if node not in live:
                live.add(node)
                pending.append(node)
    used: set[nn.Parameter] = set()
    for node in live:
        if node.op == "call_module":
            called = model.get_submodule(node.target)
            for module in called.modules():
                if (not type(module).__module__.startswith(OWN_MODULES)
                        or getattr(module, "enabled", True) is False):
                    return False
            used.update(called.parameters())
        elif node.op == "get_attr":
            owner, _, name = node.target.rpartition(".")
            value = getattr(model.get_submodule(owner), name)
            if isinstance(value, nn.Parameter):
                used.add(value)
            elif isinstance(value, nn.Module):
                return False
    return all(p in used for p in model.parameters() if p.requires_grad)


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
