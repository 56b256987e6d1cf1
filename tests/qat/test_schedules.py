import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile.errors import ConfigError
from qcompile.fused import ConvBatchNorm
from qcompile.models import SmallCNN
from qcompile.qat.quantizers import (
    activation_quantizers,
    annealable_quantizers,
    layer_groups,
    weight_quantizers,
)
from qcompile.qat.schedules import (
    FreezeBatchNorm,
    ProgressiveActivations,
    ProgressiveBits,
    StochasticPrecision,
    TemperatureAnnealing,
    default_schedules,
)
from qcompile.qat.state import Schedule, TrainState
from qcompile.quant import Quantizer
from qcompile.quant.layers import quantizable_layers
from real_data import digits, digits_calibration as calib

MIDDLE = ["features.1.0", "features.2.0"]
EDGES = ["features.0.0", "classifier"]




def float_model(seed=0):
    torch.manual_seed(seed)
    return SmallCNN().eval()


def quantized(method="lsq", model=None, passes=None, **config):
    model = model if model is not None else float_model()
    return qcompile.quantize(model, (digits().train_x[:8],), bits=2, method=method,
                             calib_data=calib(), passes=passes, **config)


def batch(step, size=32):
    data = digits()
    start = (step * size) % (len(data.train_x) - size)
    return data.train_x[start:start + size], data.train_y[start:start + size]


class Loop:
    """The training loop's side of the schedule protocol, by hand: hooks, SGD, rebuilds."""

    def __init__(self, gm, schedules, epochs, steps_per_epoch, seed=0, lr=0.05):
        self.state = TrainState(gm, epochs, steps_per_epoch, seed=seed, calib_data=calib())
        self.schedules, self.lr = schedules, lr
        self.rebuilds, self.figures = [], []

    def optimizer(self):
        self.state.structure_changed = False
        self.rebuilds.append(self.state.step)
        return torch.optim.SGD(self.state.model.parameters(), lr=self.lr)

    def run(self, until=None, after_step=None, resume=False):
        state, model = self.state, self.state.model
        for schedule in self.schedules:
            schedule.on_train_start(state)
        self.changed_at_start = state.structure_changed
        optimizer = self.optimizer()
        until = state.total_steps if until is None else until
        while state.step < until:
            if state.step % state.steps_per_epoch == 0 or resume:
                state.epoch = state.step // state.steps_per_epoch
                if not resume:
                    for schedule in self.schedules:
                        schedule.on_epoch_start(state)
                resume = False
                model.train()
            for schedule in self.schedules:
                schedule.on_step_start(state)
            if state.structure_changed:
                optimizer = self.optimizer()
            x, y = batch(state.step)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if after_step:
                after_step(state)
            state.step += 1
            if state.step % state.steps_per_epoch == 0:
                self.figures.append({k: v for s in self.schedules
                                     for k, v in s.on_epoch_end(state).items()})
        return self


def bits_of(gm, name):
    layer = gm.get_submodule(name)
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
    return layer.weight_quantizer.bits, gm.get_submodule(node.args[0].target).bits


def test_progressive_activations_quantize_weights_first_then_activations():
    gm = quantized()
    seen, ranges = [], []

    def observe(state):
        acts = [q.enabled for q in activation_quantizers(state.model)]
        seen.append((sum(acts) / len(acts), all(q.enabled for q in weight_quantizers(gm))))

    def look(state):
        ranges.append([q.step.clone() for q in activation_quantizers(gm)])

    schedule = ProgressiveActivations(weights_only_fraction=0.5)
    loop = Loop(gm, [schedule, Probe(look)], epochs=4, steps_per_epoch=3)
    loop.run(after_step=observe)
    assert seen == [(0.0, True)] * 6 + [(1.0, True)] * 6
    unchanged = [all(torch.equal(a, b) for a, b in zip(ranges[i], ranges[i + 1]))
                 for i in range(5)]
    assert all(unchanged)  # disabled: no gradient reaches them
    # recalibrated at the switch: the inputs after trained layers moved, the images did not
    assert torch.equal(ranges[5][0], ranges[6][0])
    assert all(not torch.equal(a, b) for a, b in zip(ranges[5][1:], ranges[6][1:]))
    assert [f["activations_quantized"] for f in loop.figures] == [0.0, 0.0, 1.0, 1.0]


def test_progressive_bits_lower_the_bits_stage_by_stage_from_trained_weights():
    gm = quantized()
    schedule = ProgressiveBits(stages=(8, 4, 2))
    seen, latent = [], {}

    def observe(state):
        seen.append([bits_of(gm, name) for name in MIDDLE + EDGES])
        if state.step in (3, 7):
            latent[state.step] = quantizer_free_state(gm)

    switched = {}

    def check_switch(state):
        if state.step in (4, 8) and state.step not in switched:
            switched[state.step] = quantizer_free_state(gm)

    loop = Loop(gm, [schedule, Probe(check_switch)], epochs=3, steps_per_epoch=4)
    loop.run(after_step=observe)
    middle = [[row[0], row[1]] for row in seen]
    assert middle == [[(8, 8), (8, 8)]] * 4 + [[(4, 4), (4, 4)]] * 4 + [[(2, 2), (2, 2)]] * 4
    assert all(row[2:] == [(8, 8), (8, 8)] for row in seen)
    assert loop.rebuilds == [0, 4, 8]
    for before, after in ((3, 4), (7, 8)):
        assert latent[before].keys() == switched[after].keys()
        assert all(torch.equal(latent[before][k], switched[after][k]) for k in latent[before])
    assert [f["bits"] for f in loop.figures] == [8, 4, 2]
    assert [s.node.meta["quant"]["weight_bits"] for s in quantizable_layers(gm)] == [8, 2, 2, 8]


class Probe(Schedule):
    """Looks at the model right after the schedules before it ran their step hooks."""

    def __init__(self, look):
        self.look = look

    def on_step_start(self, state):
        self.look(state)


def quantizer_free_state(gm):
    quantizers = [name for name, m in gm.named_modules() if isinstance(m, Quantizer)]
    return {k: v.clone() for k, v in gm.state_dict().items()
            if not any(k.startswith(q + ".") for q in quantizers)}


def test_progressive_bits_recalibrates_activations_at_each_stage():
    gm = quantized()
    schedule = ProgressiveBits(stages=(4, 2), boundaries=(0.5,))
    steps = {}
    loop = Loop(gm, [schedule, Probe(lambda s: steps.setdefault(
        s.step, gm.input_quantizers.features_1_0_input))], epochs=2, steps_per_epoch=2)
    loop.run()
    assert steps[0] is steps[1] and steps[2] is not steps[1]
    assert steps[1].bits == 4 and steps[2].bits == 2
    assert steps[2].step > steps[1].step  # a 2-bit step is coarser than a 4-bit one


def test_progressive_bits_rejects_stages_that_rise():
    with pytest.raises(ConfigError, match="do not increase"):
        ProgressiveBits(stages=(2, 4))
    with pytest.raises(ConfigError, match="boundaries"):
        ProgressiveBits(stages=(8, 4, 2), boundaries=(0.6, 0.3))


def test_stochastic_precision_follows_its_probability_and_is_reproducible():
    gm = quantized()
    epochs, steps = 2, 150
    schedule = StochasticPrecision(start=0.5, end=1.0, full_at=0.8)
    state = TrainState(gm, epochs, steps, seed=3)
    draws = []
    schedule.on_train_start(state)
    for step in range(epochs * steps):
        state.step = step
        schedule.on_step_start(state)
        groups = layer_groups(gm)
        assert all(len({q.enabled for q in group}) == 1 for group in groups)
        quantized_now = [group[0].enabled for group in groups]
        assert schedule.fraction == sum(quantized_now) / len(groups)
        assert schedule.probability == pytest.approx(min(0.5 + 0.5 * state.progress / 0.8, 1.0))
        draws.append(quantized_now)
    for lo, hi in ((0, 60), (60, 120), (120, 180), (180, 240)):
        p = [schedule.probability_at(s / (epochs * steps)) for s in range(lo, hi)]
        observed = sum(sum(row) for row in draws[lo:hi]) / (4 * (hi - lo))
        expected = sum(p) / len(p)
        sigma = math.sqrt(expected * (1 - expected) / (4 * (hi - lo)))
        assert abs(observed - expected) <= 4 * sigma + 1e-9
    assert all(all(row) for row in draws[240:])
    assert any(not all(row) for row in draws[:60])

    again = StochasticPrecision(start=0.5, end=1.0, full_at=0.8)
    other_seed = StochasticPrecision(start=0.5, end=1.0, full_at=0.8)
    same, other = [], []
    for step in range(60):
        for sched, out, seed in ((again, same, 3), (other_seed, other, 4)):
            sched.on_step_start(TrainState(gm, epochs, steps, seed=seed, step=step))
            out.append([group[0].enabled for group in layer_groups(gm)])
    assert same == draws[:60]
    assert other != draws[:60]

    state.step = epochs * steps
    schedule.on_epoch_end(state)
    assert schedule.probability_at(state.progress) == 1.0
    assert all(q.enabled for q in gm.modules() if isinstance(q, Quantizer))


def test_stochastic_precision_trains_and_leaves_every_quantizer_on():
    gm = quantized()
    loop = Loop(gm, [StochasticPrecision(start=0.2)], epochs=2, steps_per_epoch=4)
    loop.run()
    assert all(q.enabled for q in gm.modules() if isinstance(q, Quantizer))
    assert loop.figures[0]["quantized_fraction"] < 1.0


def test_temperature_annealing_reaches_the_hard_staircase():
    gm = quantized("qn", first_last_method="qn")  # the 8-bit layers' windowed sums too
    anneal = TemperatureAnnealing(start=1.0, end=200.0)
    temperatures = []
    probe = Probe(lambda s: temperatures.append(
        {float(q.temperature) for q in annealable_quantizers(gm)}))
    loop = Loop(gm, [anneal, FreezeBatchNorm(at=0.5), probe], epochs=5, steps_per_epoch=2,
                lr=0.01)
    loop.run(until=9)
    assert temperatures[::2] == [{1.0 + 199.0 * e / 4} for e in range(5)]
    inputs = quantizer_inputs(gm, digits().train_x[:64])
    for name, quantizer in named_annealable(gm):
        assert quantizer.hard is False
        soft, hard = soft_and_hard(quantizer, inputs[name])
        step = quantizer.scales()[0].detach().reshape(quantizer.param_shape(soft))
        clear = clear_of_thresholds(quantizer, inputs[name], margin=0.05)
        assert clear.float().mean() > 0.25, name  # 8x8 digits: half the pixels are background
        assert ((soft - hard).abs() / step)[clear].mean() < 0.02, name
        soft, hard = soft_and_hard(quantizer, near_thresholds(quantizer))
        assert ((soft - hard).abs() / step.reshape(-1, 1)).max() > 0.05, name
    loop.run()
    assert loop.figures[-1]["temperature"] == 200.0
    for name, quantizer in named_annealable(gm):
        assert quantizer.hard is True
        soft, hard = soft_and_hard(quantizer, near_thresholds(quantizer))
        torch.testing.assert_close(soft, hard, rtol=0, atol=0, msg=name)
    x = digits().test_x[:32]
    torch.testing.assert_close(gm.train()(x), gm.eval()(x), rtol=0, atol=0)


def soft_and_hard(quantizer, x):
    """The training forward and the eval forward (always the staircase) on ``x``."""
    with torch.no_grad():
        soft = quantizer.train()(x)
        hard = quantizer.eval()(x)
    quantizer.train()
    return soft, hard


def clear_of_thresholds(quantizer, x, margin):
    """Where ``beta * x`` lies more than ``margin`` (in steps) from every threshold ``b_i``: at
    any finite temperature a value on a threshold stays half way between two levels."""
    with torch.no_grad():
        shape = quantizer.param_shape(x)
        scaled = (quantizer.beta.reshape(shape) * x).unsqueeze(-1)
        biases = quantizer.biases.reshape(*shape, -1)
        return ((scaled - biases).abs() > margin).all(dim=-1)


def near_thresholds(quantizer):
    """Inputs just above each threshold, where a soft step is still far from 0 or 1."""
    with torch.no_grad():
        return (quantizer.biases + 0.01) / quantizer.beta[:, None]


def named_annealable(gm):
    return [(n, m) for n, m in gm.named_modules() if m in annealable_quantizers(gm)]


def quantizer_inputs(gm, x):
    seen, hooks = {}, []
    for name, module in named_annealable(gm):
        hooks.append(module.register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, args[0].detach())))
    with torch.no_grad():
        gm.eval()(x)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("passes", [None, "canonicalize,assign-bits,insert-quantizers"])
def test_batch_norm_statistics_stop_changing_after_the_freeze_point(passes):
    gm = quantized(passes=passes)
    norms = [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and any(isinstance(m, ConvBatchNorm) for m in gm.modules()) == (passes is None)
    means = []
    loop = Loop(gm, [FreezeBatchNorm(at=0.5)], epochs=4, steps_per_epoch=3)
    loop.run(after_step=lambda s: means.append([m.running_mean.clone() for m in norms]))
    changed = [any(not torch.equal(a, b) for a, b in zip(means[i], means[i + 1]))
               for i in range(len(means) - 1)]
    assert changed[:5] == [True] * 5 and changed[5:] == [False] * 6
    assert [f["bn_frozen"] for f in loop.figures] == [0.0, 0.0, 1.0, 1.0]


def test_default_schedules_follow_the_model():
    assert [type(s) for s in default_schedules(quantized("qn"))] == [TemperatureAnnealing,
                                                                     FreezeBatchNorm]
    assert [type(s) for s in default_schedules(quantized("lsq"))] == [FreezeBatchNorm]
    frozen = quantized("lsq", passes="frozen-bn")
    assert default_schedules(frozen) == []


RESUMABLE = [  # (method, schedule factory)
    ("lsq", lambda: ProgressiveActivations(0.5)),
    ("qn", lambda: ProgressiveBits((8, 4, 2))),
    ("lsq", lambda: StochasticPrecision(0.3, 1.0, full_at=0.7)),
    ("qn", lambda: TemperatureAnnealing(1.0, 50.0, mode="exponential")),
    ("lsq", lambda: FreezeBatchNorm(0.5)),
]


@pytest.mark.parametrize("method,make", RESUMABLE,
                         ids=["activations", "bits", "stochastic", "temperature", "freeze-bn"])
def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(method, make):
    epochs, steps, stop = 4, 3, 7
    whole = quantized(method)
    reference = make()
    Loop(whole, [reference], epochs, steps).run()

    first = quantized(method)
    interrupted = make()
    Loop(first, [interrupted], epochs, steps).run(until=stop)
    saved_model, saved_schedule = first.state_dict(), interrupted.state_dict()

    resumed_model = quantized(method)
    resumed = make()
    resumed.load_state_dict(saved_schedule)
    loop = Loop(resumed_model, [resumed], epochs, steps)
    loop.state.step, loop.state.epoch = stop, stop // steps
    resumed.prepare_for_resume(loop.state)
    resumed_model.load_state_dict(saved_model)
    assert resumed.state_dict() == saved_schedule
    loop.run(resume=True)
    assert loop.rebuilds[0] == stop and not loop.changed_at_start
    assert resumed.state_dict() == reference.state_dict()
    final, expected = resumed_model.state_dict(), whole.state_dict()
    assert final.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=0, atol=0, msg=key)
    x = digits().test_x[:32]
    torch.testing.assert_close(resumed_model.eval()(x), whole.eval()(x), rtol=0, atol=0)
