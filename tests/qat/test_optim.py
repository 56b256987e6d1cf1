"""The optimizer ``train`` builds: fused where torch allows, with the per-tensor update rule."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.qat.optim import OptimConfig, fusable, make_optimizer, parameter_groups
from tiny_runs import quantized_model


def config(optimizer: str, weight_decay: float, quantizer_lr: float | None) -> OptimConfig:
    return OptimConfig(lr=1e-2, quantizer_lr=quantizer_lr, weight_decay=weight_decay,
                       optimizer=optimizer, lr_schedule="constant")


def per_tensor(groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    """The reference: torch's optimizer with its per-tensor loop."""
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=0.9, foreach=False, fused=False)
    return torch.optim.Adam(groups, lr=optim.lr, foreach=False, fused=False)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_quantized_models_optimizer_is_fused_on_the_cpu(optimizer):
    model = quantized_model(method="lsq", bits=4).train()
    optimizer = make_optimizer(parameter_groups(model, config(optimizer, 0.0, None)),
                               config(optimizer, 0.0, None))
    assert optimizer.defaults["fused"] is True


def test_tensors_a_fused_kernel_cannot_take_are_not_fused():
    assert fusable([torch.zeros(2), torch.zeros(3, dtype=torch.float64)])
    assert not fusable([])
    assert not fusable([torch.zeros(2), torch.zeros(2, dtype=torch.int64)])
    assert not fusable([torch.zeros(2), torch.zeros(2, device="meta")])


@settings(max_examples=25, deadline=None)
@given(optimizer=st.sampled_from(["adam", "sgd"]), seed=st.integers(0, 2**16),
       weight_decay=st.sampled_from([0.0, 1e-3]), quantizer_lr=st.sampled_from([None, 3e-2]))
def test_the_fused_update_is_the_per_tensor_update(optimizer, seed, weight_decay, quantizer_lr):
    """Three steps of the fused optimizer over a quantized model's parameter groups (weights,
    no-decay, quantizer parameters) move every parameter where the per-tensor loop does."""
    optim = config(optimizer, weight_decay, quantizer_lr)
    model = quantized_model(method="lsq", bits=4).train()
    fused_params = {name: p.detach().clone().requires_grad_(True)
                    for name, p in model.named_parameters()}
    loop_params = {name: p.detach().clone().requires_grad_(True)
                   for name, p in model.named_parameters()}
    groups = parameter_groups(model, optim)
    names = {id(p): name for name, p in model.named_parameters()}

    def regroup(params):
        return [dict(group, params=[params[names[id(p)]] for p in group["params"]])
                for group in groups]

    fused = make_optimizer(regroup(fused_params), optim)
    loop = per_tensor(regroup(loop_params), optim)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        for name, p in fused_params.items():
            grad = torch.randn(p.shape, generator=gen)
            p.grad, loop_params[name].grad = grad.clone(), grad.clone()
        fused.step()
        loop.step()
    for name, p in fused_params.items():
        torch.testing.assert_close(p, loop_params[name], rtol=1e-5, atol=1e-7, msg=name)
