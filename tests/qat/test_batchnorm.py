"""Batch-norm re-estimation at the end of each epoch (qcompile.qat.batchnorm)."""

import copy

import pytest
import torch
from torch import nn

import qcompile
from qcompile.fused import ConvBatchNorm
from qcompile.qat import FreezeBatchNorm, Schedule, TrainState
from qcompile.qat.batchnorm import reestimate_batch_norms, updating_batch_norms
from qcompile.qat.loaders import EpochBatches, as_source
from qcompile.quant import Quantizer
from tiny_runs import DropoutCNN, digits, quantized_model, train_pair, val_pair


def fused_layers(model: nn.Module) -> list[ConvBatchNorm]:
    return [m for m in model.modules() if isinstance(m, ConvBatchNorm)]


def batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(x.split(size))


def test_statistics_are_the_average_of_the_batch_statistics():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
    model = nn.Sequential(conv, bn, nn.ReLU()).train()
    with torch.no_grad():
        bn.running_mean.fill_(7.0)
        bn.running_var.fill_(9.0)
    x = digits().train_x[:96]
    used = reestimate_batch_norms(model, batches(x, 32), examples=64)
    assert used == 64
    with torch.no_grad():
        outputs = [conv(b) for b in batches(x[:64], 32)]
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outputs]).mean(0)
    variances = torch.stack([o.var(dim=(0, 2, 3)) for o in outputs]).mean(0)
    torch.testing.assert_close(bn.running_mean, means)
    torch.testing.assert_close(bn.running_var, variances)
    assert bn.momentum == 0.1 and bn.training


def test_the_rest_of_the_model_runs_as_validation_does_and_keeps_its_modes():
    model = quantized_model().train()
    quantizer_modes = []

    def record(module, _):
        quantizer_modes.append(module.training)

    handles = [q.register_forward_pre_hook(record) for q in model.modules()
               if isinstance(q, Quantizer)]
    dropout_rng = torch.get_rng_state()
    reestimate_batch_norms(model, batches(train_pair()[0], 64), examples=128)
    for handle in handles:
        handle.remove()
    assert quantizer_modes and not any(quantizer_modes)
    assert torch.equal(torch.get_rng_state(), dropout_rng)  # dropout was off
    assert all(m.training for m in model.modules())


def test_frozen_and_eval_batch_norms_are_left_alone():
    model = quantized_model().train()
    FreezeBatchNorm(at=0.0).on_step_start(TrainState(model, epochs=1, steps_per_epoch=1))
    assert updating_batch_norms(model) == []
    before = copy.deepcopy(model.state_dict())
    assert reestimate_batch_norms(model, batches(train_pair()[0], 64), examples=128) == 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_two_shares_averaged_equal_one_process_over_all_batches():
    """Exact for batch norms whose input does not depend on the statistics being estimated (a
    fused conv-BN's folded weight does)."""
    x = train_pair()[0]

    def model():
        torch.manual_seed(0)
        return DropoutCNN().train()

    whole, first, second = model(), model(), model()
    reestimate_batch_norms(whole, batches(x[:256], 64), examples=256)
    reestimate_batch_norms(second, batches(x[128:256], 64), examples=128)
    norms = [bn for _, bn in updating_batch_norms(second)]
    theirs = [bn.running_mean for bn in norms] + [bn.running_var for bn in norms]

    def average(tensors):
        """The mean over two processes, this one and ``second``."""
        for tensor, other in zip(tensors, theirs, strict=True):
            tensor.copy_((tensor + other) / 2)

    reestimate_batch_norms(first, batches(x[:128], 64), examples=128, average=average)
    for (_, got), (_, expected) in zip(updating_batch_norms(first), updating_batch_norms(whole),
                                       strict=True):
        torch.testing.assert_close(got.running_mean, expected.running_mean)
        torch.testing.assert_close(got.running_var, expected.running_var)


def test_every_epoch_ends_with_re_estimated_statistics():
    model = quantized_model(bits=2).train()
    history = qcompile.train(model, train_pair(), val_pair(), epochs=2, lr=0.01, batch_size=32,
                             progress=False, schedules=[], bn_reestimation=96)
    assert [r["bn_reestimated"] for r in history.records] == [96, 96]
    # the final statistics are those of the final weights on the last epoch's first batches
    expected = copy.deepcopy(model).train()
    loader = EpochBatches(as_source(train_pair(), 32), seed=0).loader(1)
    reestimate_batch_norms(expected, (b[0] for b in loader), examples=96)
    for (_, got), (_, want) in zip(updating_batch_norms(model.train()),
                                   updating_batch_norms(expected), strict=True):
        torch.testing.assert_close(got.running_mean, want.running_mean)
        torch.testing.assert_close(got.running_var, want.running_var)


def test_re_estimation_can_be_switched_off_and_rejects_nonsense():
    model = quantized_model().train()
    history = qcompile.train(model, train_pair(64), epochs=1, lr=0.01, batch_size=32,
                             progress=False, schedules=[], bn_reestimation=0)
    assert "bn_reestimated" not in history.records[0]
    with pytest.raises(qcompile.errors.ConfigError, match="bn_reestimation"):
        qcompile.train(model, train_pair(64), epochs=1, bn_reestimation=-1, progress=False)


def test_freezing_freezes_statistics_re_estimated_at_that_step():
    model = quantized_model(bits=2).train()
    checked = []

    class Check(Schedule):
        def on_step_start(self, state):
            if checked or not any(m.statistics_frozen for m in fused_layers(state.model)):
                return
            expected = copy.deepcopy(state.model)
            for module in fused_layers(expected):
                module.statistics_frozen = False
            loader = EpochBatches(as_source(train_pair(), 32), seed=0).loader(state.epoch)
            reestimate_batch_norms(expected, (b[0] for b in loader), examples=96)
            for got, want in zip(fused_layers(state.model), fused_layers(expected), strict=True):
                torch.testing.assert_close(got.bn.running_mean, want.bn.running_mean)
                torch.testing.assert_close(got.bn.running_var, want.bn.running_var)
            checked.append(state.step)

    qcompile.train(model, train_pair(), epochs=2, lr=0.01, batch_size=32, progress=False,
                   schedules=[FreezeBatchNorm(at=0.5), Check()], bn_reestimation=96)
    assert checked == [8]  # 8 steps an epoch: frozen at the second epoch's first step

