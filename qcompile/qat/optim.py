"""Optimizer and learning-rate schedule for quantization-aware training.

Parameter groups follow the QAT papers (Esser et al. 2020, sec. 2.2; Jung et al. 2019, sec. 4):
the quantizers' own parameters (steps, intervals, levels, temperatures) train at their own
learning rate and without weight decay, which would otherwise shrink them toward zero and with
them the quantization range; biases and normalization parameters carry no weight decay either.
"""

import math
import numbers
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from qcompile.errors import ConfigError
from qcompile.quant.base import Quantizer

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("cosine", "onecycle", "constant")
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    quantizer_lr: float | None
    weight_decay: float
    optimizer: str
    lr_schedule: str

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; "
                              f"choose one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}; "
                              f"choose one of {', '.join(LR_SCHEDULES)}")
        checked = ["lr", "weight_decay"] + ["quantizer_lr"] * (self.quantizer_lr is not None)
        for name in checked:
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not 0 <= value < math.inf):
                raise ConfigError(f"{name} must be a finite non-negative number, got "
                                  f"{getattr(self, name)!r}")


def parameter_groups(model: nn.Module, config: OptimConfig,
                     teacher_parameters: list[nn.Parameter] = ()) -> list[dict]:
    """The model's trainable parameters in named groups: ``weights`` (decayed), ``no_decay``
    (biases, normalization), ``quantizers`` (own lr, no decay) and ``teacher`` (trained jointly)."""
    quantizer, no_decay, weights = [], [], []
    owner = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owner.setdefault(param, module)
    quantizer_params = {p for m in model.modules() if isinstance(m, Quantizer)
                        for p in m.parameters()}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param in quantizer_params:
            quantizer.append(param)
        elif name.rsplit(".", 1)[-1] == "bias" or isinstance(owner[param], _NORMS):
            no_decay.append(param)
        else:
            weights.append(param)
    teacher = [p for p in teacher_parameters if p.requires_grad]
    groups = [
        dict(name="weights", params=weights, lr=config.lr, weight_decay=config.weight_decay),
        dict(name="no_decay", params=no_decay, lr=config.lr, weight_decay=0.0),
        dict(name="quantizers", params=quantizer, weight_decay=0.0,
             lr=config.lr if config.quantizer_lr is None else config.quantizer_lr),
        dict(name="teacher", params=teacher, lr=config.lr, weight_decay=config.weight_decay),
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("the model has no trainable parameters (requires_grad is False "
                          "everywhere); nothing to train")
    return groups


def make_optimizer(groups: list[dict], config: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 or Adam over ``groups``, as one fused kernel per group where the
    parameters allow it (:func:`fusable`).

    The per-tensor update costs a handful of operator calls per parameter, and a quantized model
    has many tiny parameters (a step size, an interval, per layer and per activation): unfused,
    their updates cost more than those of the weights. Fused, every parameter of a group is
    updated in one call, with the same update rule.
    """
    fused = fusable([p for group in groups for p in group["params"]])
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, fused=fused)
    return torch.optim.Adam(groups, lr=config.lr, fused=fused)


def fusable(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused optimizer kernels take ``params``: dense floating-point tensors,
    all on the CPU or all on one CUDA device."""
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(p.is_floating_point() and not p.is_sparse for p in params))


def make_lr_schedule(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int,
                     done_steps: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step schedule over ``total_steps``, advanced to ``done_steps`` (after a rebuild)."""
    total_steps = max(total_steps, 1)
    if config.lr_schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    elif config.lr_schedule == "onecycle":
        max_lr = [group["lr"] for group in optimizer.param_groups]
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr,
                                                       total_steps=total_steps)
    else:
        schedule = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        for _ in range(min(done_steps, total_steps)):
            schedule.step()
    return schedule
