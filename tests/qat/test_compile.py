"""Compiled training (``train(..., compile=True)``): whole graphs, eager's training, exact resume."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch.profiler import profile

import qcompile
from qcompile.errors import TrainingInterrupted
from qcompile.fused import ConvBatchNorm
from qcompile.models import SmallCNN
from qcompile.qat import StochasticPrecision, train
from qcompile.qat import loop
from qcompile.qat.loop import COMPILED_GRAPHS, graph_room
from qcompile.qat.schedules import Schedule
from qcompile.qat.state import TrainState
from qcompile.quant import Quantizer, available_methods, make_quantizer
from tiny_runs import (FreezeStatisticsAt, InterruptAt, assert_same_weights, digits,
                       quantized_model, quantizers, train_pair, val_pair)

METHODS = available_methods()
WORKER = Path(__file__).with_name("ddp_compile_worker.py")


def quantizer(method: str, role: str, bits: int) -> tuple[Quantizer, torch.Tensor]:
    """An initialized quantizer in training mode and an input for it: a per-channel weight
    (signed) or a per-tensor activation after a ReLU (unsigned)."""
    gen = torch.Generator().manual_seed(bits)
    if role == "weight":
        x = torch.randn(6, 3, 3, 3, generator=gen)
        q = make_quantizer(method, role, bits, signed=True, per_channel=True, channels=6)
    else:
        x = torch.relu(torch.randn(8, 6, 5, 5, generator=gen))
        q = make_quantizer(method, role, bits, signed=False)
    q.initialize(x)
    return q.train(), x.requires_grad_(True)


def graph_breaks(function, *args) -> list[str]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(function)(*args)
    return [reason.reason.splitlines()[0] for reason in explained.break_reasons]


@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("method", METHODS)
def test_a_quantizer_training_forward_is_one_graph(method, role, bits):
    q, x = quantizer(method, role, bits)
    assert graph_breaks(lambda x: q(x).sum(), x) == []
    q.set_hard(True)
    assert graph_breaks(lambda x: q(x).sum(), x) == []


@pytest.mark.parametrize("method", METHODS)
def test_a_quantized_model_training_forward_is_one_graph(method):
    model = quantized_model(method=method, bits=2).train()
    x = digits().train_x[:8]
    assert graph_breaks(model, x) == []
    for module in model.modules():
        if isinstance(module, ConvBatchNorm):
            module.freeze_statistics()
    assert graph_breaks(model, x) == []


def test_a_compiled_fused_batch_norm_differentiates_with_the_variance_it_folded():
    """The batch norm updates its running variance in place after the fold has read it; the
    compiled backward must still use the value read (a stale read once gave gradients 10-90%
    off)."""
    torch.manual_seed(0)
    fused = ConvBatchNorm(torch.nn.Conv2d(4, 8, 3, padding=1, bias=False),
                          torch.nn.BatchNorm2d(8)).train()
    fused.bn.running_var.uniform_(0.5, 2.0)
    fused.weight_quantizer = make_quantizer("lsq", "weight", 2, signed=True, per_channel=True,
                                            channels=8)
    fused.weight_quantizer.initialize(fused.folded_weight().detach())
    x = torch.relu(torch.randn(16, 4, 10, 10))
    projection = torch.randn(16, 8, 10, 10)
    start = {k: v.clone() for k, v in fused.state_dict().items()}
    grads = []
    for forward in (fused, torch.compile(fused, dynamic=False)):
        fused.load_state_dict(start)
        fused.zero_grad(set_to_none=True)
        (forward(x) * projection).sum().backward()
        grads.append({name: p.grad.clone() for name, p in fused.named_parameters()})
    eager, compiled = grads
    for name, grad in eager.items():
        assert float((compiled[name] - grad).norm()) < 1e-4 * float(grad.norm()), name


def gradients(model, x, y, compiled: bool) -> tuple[float, dict[str, torch.Tensor], dict]:
    """Loss, parameter gradients and buffers after one training forward and backward."""
    for param in model.parameters():
        param.grad = None
    forward = torch.compile(model, dynamic=False) if compiled else model
    projection = torch.randn(len(x), 10, generator=torch.Generator().manual_seed(1),
                             dtype=x.dtype)
    logits = forward(x)
    loss = F.cross_entropy(logits, y) + (logits * projection).mean()
    loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    return float(loss.detach()), grads, {k: v.clone() for k, v in model.named_buffers()}


def inside(event, name: str) -> bool:
    while event is not None:
        if event.name == name:
            return True
        event = event.cpu_parent
    return False


@pytest.mark.parametrize("method", [None, "lsq", "qn"])
def test_compiled_convolution_gradients_come_in_a_layout_the_convolution_takes(method):
    """No compiled training step, float (None) or quantized, copies an activation or its
    gradient inside ``aten.convolution_backward``, which it does when handed tensors whose
    strides make oneDNN choose another memory format than the gradient's: see
    :func:`qcompile.qat.loop.compiled` (quantized: a gradient in an order that is neither
    contiguous nor channels-last, as the one-channel first convolution's channels-last weight
    strides tie) and :class:`qcompile.qat.loop.OneChannelChannelsLast` (float: the one-channel
    input batch read as contiguous). (The small copies of weight gradients there are the float
    model's too.)"""
    torch._dynamo.reset()
    x, y = train_pair(64)
    torch.manual_seed(0)
    if method is None:
        model = qcompile.trace(SmallCNN(1, 10, width=4), (x[:1],)).train()
    else:
        model = qcompile.quantize(SmallCNN(1, 10, width=4), (x[:1],), bits=4, method=method,
                                  calib_data=[(x,)]).train()
    step = loop.compiled(model, torch.device("cpu"))

    def run():
        model.zero_grad()
        F.cross_entropy(step(x), y).backward()

    run()
    with profile(record_shapes=True) as prof:
        run()
    backward = [e for e in prof.events() if e.name == "aten::convolution_backward"]
    copies = [e.input_shapes[0] for e in prof.events()
              if e.name == "aten::copy_" and inside(e, "aten::convolution_backward")]
    assert len(backward) == 3
    assert [shape for shape in copies if shape[0] == len(x)] == []


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_a_compiled_training_step_has_the_eager_gradients(method):
    """Float rounding apart, the same loss, gradients and updated statistics (the fused batch
    norm's backward must see the running variance its forward folded with). Rounding is judged
    against a float64 evaluation: the compiled gradient is as close to it as the eager one, up
    to a factor of ten, or within 1e-3 of its norm (a sum that nearly cancels, such as a QN
    scale's gradient, is far less accurate than that in eager float32 too)."""
    x, y = train_pair(64)
    torch.manual_seed(0)
    model = qcompile.quantize(SmallCNN(1, 10, width=4), (x[:1],), bits=2, method=method,
                              calib_data=[(x,)]).train()
    for module in model.modules():
        if isinstance(module, ConvBatchNorm):
            module.bn.running_var.mul_(4)  # far from the batch's: the update moves it a lot
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _, exact, _ = gradients(model.double(), x.double(), y, compiled=False)
    model.float().load_state_dict(start)
    eager_loss, eager, eager_buffers = gradients(model, x, y, compiled=False)
    model.load_state_dict(start)
    compiled_loss, compiled, compiled_buffers = gradients(model, x, y, compiled=True)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    for name, grad in exact.items():
        ours = float((compiled[name].double() - grad).norm())
        theirs = float((eager[name].double() - grad).norm())
        assert ours <= max(10 * theirs, 1e-3 * float(grad.norm())), (name, ours, theirs)
    for name, buffer in eager_buffers.items():
        torch.testing.assert_close(compiled_buffers[name], buffer, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("method, epochs", [("lsq", 2), ("qil", 5)])
def test_compiled_training_learns_as_eager_training_does(method, epochs):
    """QIL's intervals learn slowly on 8x8 digits: 2 epochs reach ~0.55, 4 reach ~0.82."""
    data = digits()
    histories = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = qcompile.quantize(SmallCNN(1, 10, width=8), (data.train_x[:1],), bits=4,
                                  method=method, calib_data=[(data.train_x[:64],)])
        histories.append(train(model, (data.train_x, data.train_y), (data.test_x, data.test_y),
                               epochs=epochs, lr=3e-3, batch_size=32, progress=False,
                               compile=compiled))
    eager, compiled = histories
    assert compiled.initial_val_accuracy == eager.initial_val_accuracy < 0.3
    # float rounding differs, so the runs drift apart step by step: they must learn alike, not
    # identically (an epoch's accuracy after 1 epoch once differed by 6 points, for qil)
    for ours, theirs in zip(compiled.records, eager.records, strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=0.15)
    assert compiled.final_val_accuracy == pytest.approx(eager.final_val_accuracy, abs=0.08)
    assert compiled.final_val_accuracy > 0.8


def compiled_run(checkpoint_dir=None, *schedules, resume=False):
    model = quantized_model()
    history = train(model, train_pair(), val_pair(), epochs=3, lr=5e-3, seed=7, progress=False,
                    checkpoint_dir=checkpoint_dir, resume=resume, compile=True,
                    schedules=[FreezeStatisticsAt(1), *schedules])
    return model, history


@pytest.mark.slow
@pytest.mark.parametrize("switching", [False, True])
def test_an_interrupted_compiled_run_resumes_bit_for_bit(tmp_path, switching):
    """Also with stochastic precision, whose switches a compiled step reads as gates."""
    extra = [StochasticPrecision(start=0.4)] if switching else []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected, expected_history = compiled_run(None, *extra)
        with pytest.raises(TrainingInterrupted):
            compiled_run(tmp_path, *extra, InterruptAt(6))
        resumed, history = compiled_run(tmp_path, *extra, InterruptAt(None), resume=True)
    finally:
        torch.set_num_threads(threads)
    assert expected.state_dict().keys() == quantized_model().state_dict().keys()
    assert_same_weights(resumed, expected)
    untimed = [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")}
               for r in history.records]
    assert untimed == [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")}
                       for r in expected_history.records]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("switching", [False, True])
def test_compiled_training_under_ddp_keeps_the_processes_in_step(tmp_path, switching):
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(WORKER), str(tmp_path)]
    command += ["switching"] if switching else []
    result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert any(not torch.equal(first["initial"][n], second["initial"][n]) for n in first["initial"])
    for name in first["final"]:
        assert torch.equal(first["final"][name], second["final"][name]), name
    assert any(not torch.equal(first["final"][n], first["initial"][n]) for n in first["final"])
    assert first["records"][-1]["train_loss"] < first["records"][0]["train_loss"]


class SwitchedOffStayPut(Schedule):
    """After stochastic precision's draw: the parameters of the quantizers it switched off for
    the previous step are where that step found them."""

    def __init__(self):
        self.held: dict[int, list[torch.Tensor]] = {}
        self.checked = 0

    def on_step_start(self, state):
        for quantizer in quantizers(state.model):
            before = self.held.get(id(quantizer))
            if before is not None:
                now = [p.detach() for p in quantizer.parameters()]
                assert all(torch.equal(a, b) for a, b in zip(before, now, strict=True))
                self.checked += 1
        self.held = {id(q): [p.detach().clone() for p in q.parameters()]
                     for q in quantizers(state.model) if not q.enabled}


def test_compiled_stochastic_precision_is_one_graph_and_leaves_switched_off_quantizers_alone():
    """Each step switches another combination of layers to full precision; compiled, the
    switches are data (gates), not a new graph per combination (dynamo's limit of 8 graphs was
    reached, and the rest ran eagerly). A switched-off quantizer's parameters get no gradient,
    as in an eager step, so Adam's momentum does not move them."""
    model = quantized_model()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    probe = SwitchedOffStayPut()
    train(model, train_pair(), epochs=3, batch_size=32, lr=5e-3, seed=3, progress=False,
          compile=True, schedules=[StochasticPrecision(start=0.3), probe])
    assert probe.checked >= 10
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert all(q.gate is None and q.enabled for q in quantizers(model))


@pytest.mark.parametrize("method", ["lsq", "qn"])
def test_a_gated_quantizer_compiled_is_the_eager_switch(method):
    """Gate off: the input itself and its gradient unchanged; on: the quantized value and its
    gradients, as the eager quantizer switched by ``enabled``."""
    from qcompile.qat.quantizers import attach_gates, sync_gates

    q, x = quantizer(method, "activation", 2)
    torch._dynamo.reset()  # the suite's other compiled quantizers count against the limit of 8
    gated = attach_gates(q, x.device)
    compiled = torch.compile(q, dynamic=False, fullgraph=True)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    for enabled in (False, True, False):
        results = []
        for forward in (compiled, q):
            q.enabled = enabled
            sync_gates(gated)
            x.grad = None
            y = forward(x)
            (y * upstream).sum().backward()
            results.append((y.detach(), x.grad.clone()))
        (ours, our_grad), (eager, eager_grad) = results
        if enabled:
            torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(our_grad, eager_grad, rtol=1e-5, atol=1e-6)
            assert not torch.equal(ours, x.detach())
        else:
            assert torch.equal(ours, x.detach()) and torch.equal(our_grad, upstream)


class SwitchEachEpoch(Schedule):
    """Switches the quantizers on or off by the bits of the epoch's number as each epoch starts:
    a new combination, so a new graph, every epoch."""

    name = "switch"

    def on_epoch_start(self, state: TrainState) -> None:
        for bit, quantizer in enumerate(quantizers(state.model)):
            quantizer.enabled = not (state.epoch + 1) >> bit & 1


def test_graph_room_raises_dynamos_limit_for_the_loop_alone():
    default = torch._dynamo.config.recompile_limit
    with graph_room(True):
        assert torch._dynamo.config.recompile_limit == COMPILED_GRAPHS
    assert torch._dynamo.config.recompile_limit == default
    with graph_room(False):
        assert torch._dynamo.config.recompile_limit == default
    with torch._dynamo.config.patch(recompile_limit=2 * COMPILED_GRAPHS), graph_room(True):
        assert torch._dynamo.config.recompile_limit == 2 * COMPILED_GRAPHS


@pytest.mark.slow
def test_a_compiled_run_compiles_every_graph_its_schedules_make():
    """Ten settings in one run, ten graphs: with dynamo's default limit of 8 the last two epochs
    ran eagerly."""
    model = quantized_model()
    epochs = 10
    assert 2 ** len(quantizers(model)) > epochs
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train(model, train_pair(64), epochs=epochs, batch_size=64, lr=1e-3, seed=0, progress=False,
          compile=True, schedules=[SwitchEachEpoch()])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == epochs


def test_refresh_windows_chooses_what_each_quantizer_would_in_one_read_back(monkeypatch):
    """``refresh_windows`` before a compiled step: every QN quantizer of the model chooses the
    window (and grid) its own ``refresh_window`` chooses, across 8- and 4-bit quantizers,
    temperatures and fixed or learned thresholds, from one ``tolist`` for all of them, and no
    number is read from a tensor one at a time (``item``, ``float()``, ``torch.equal``): on a
    GPU each read is a wait for the device."""
    from qcompile.qat.quantizers import refresh_windows, window_quantizers
    from qcompile.quant.qn import QNQuantizer

    x = digits().train_x[:64]
    model = qcompile.quantize(SmallCNN(), (x[:2],), bits=4, method="qn", first_last_method="qn",
                              calib_data=[(x,)])
    qns = [m for m in model.modules() if isinstance(m, QNQuantizer)]
    temperatures = (1.0, 3.0, 40.0, 90.0)
    for index, quantizer in enumerate(qns):
        quantizer.set_temperature(temperatures[index % len(temperatures)])
        quantizer.learn_thresholds(index % 3 != 0)
    read_backs = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist",
                        lambda tensor: read_backs.append(tensor.shape) or tolist(tensor))
    listed = window_quantizers(model)
    assert listed == qns
    with profile() as profiled:
        refresh_windows(listed)
    monkeypatch.undo()
    assert len(read_backs) == 1 and read_backs[0][0] >= 2 * len(qns)
    reads = {"aten::item", "aten::_local_scalar_dense", "aten::equal"}
    assert not reads & {event.name for event in profiled.events()}
    together = [(q.soft_window, q.soft_grid) for q in qns]
    for quantizer in qns:
        quantizer.soft_window, quantizer.soft_grid = -1, -1
        quantizer.refresh_window()
    assert [(q.soft_window, q.soft_grid) for q in qns] == together
    windows = {window for window, _ in together}
    assert len(windows) >= 3 and any(grid is not None for _, grid in together)
