"""Run by ``torchrun`` in the distributed tests: quantize and train a small CNN on digits.

Each rank builds its model (and teacher) from a different seed, so equal results show that DDP
synchronised them. ``python ddp_worker.py OUT MODE`` writes ``OUT/<MODE>-rank<R>.pt`` (the initial
and final state dicts, the teacher's, the history records). Modes: ``plain``; ``joint`` (with a
jointly trained teacher); ``frozen`` and ``frozen-live`` (a frozen teacher, the same on every
rank, its logits cached or run every step); ``stop`` (rank 0 alone gets SIGINT at step 5);
``resume`` (continues the stopped run from its checkpoint); ``switching`` (weights first, then
stochastic precision: steps that leave quantizers' parameters out of the loss).
"""

import os
import signal
import sys

import torch

import qcompile
from qcompile.data import load_builtin
from qcompile.errors import TrainingInterrupted
from qcompile.models import SmallCNN
from qcompile.qat import Distillation, ProgressiveActivations, Schedule, StochasticPrecision


class SignalRankZero(Schedule):
    """Sends SIGINT to rank 0's own process as step ``step`` starts (the other rank gets none)."""

    may_leave_parameters_unused = False

    def __init__(self, step: int | None):
        self.step = step

    def on_step_start(self, state):
        if state.step == self.step and int(os.environ["RANK"]) == 0:
            os.kill(os.getpid(), signal.SIGINT)


def trained_teacher(data) -> SmallCNN:
    """The same teacher on every rank: a few plain steps from one seed (its logits then differ
    between examples, as a trained teacher's do)."""
    torch.manual_seed(100)
    teacher = SmallCNN(in_channels=1, classes=10, width=4)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for x, y in zip(data.train_x[:256].split(32), data.train_y[:256].split(32)):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(teacher(x), y).backward()
        optimizer.step()
    return teacher.eval()


def main(out: str, mode: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    data = load_builtin("digits")
    torch.manual_seed(rank)
    model = SmallCNN(in_channels=1, classes=10, width=4)
    teacher = SmallCNN(in_channels=1, classes=10, width=4)
    qm = qcompile.quantize(model, (data.train_x[:1],), bits=4, method="lsq",
                           calib_data=[(data.train_x[:64],)])
    initial = {k: v.clone() for k, v in qm.state_dict().items()}
    checkpoint_dir = os.path.join(out, "stopped" if mode in ("stop", "resume") else mode)
    settings = dict(epochs=2, batch_size=32, lr=5e-3, checkpoint_dir=checkpoint_dir,
                    progress=False, resume=mode == "resume")
    if mode == "joint":
        settings["distillation"] = Distillation(teacher, joint=True)
    if mode in ("frozen", "frozen-live"):
        teacher = trained_teacher(data)
        settings["distillation"] = Distillation(teacher, cache=mode == "frozen")
    if mode == "switching":
        settings["schedules"] = [ProgressiveActivations(0.25), StochasticPrecision(start=0.3)]
        settings["calib_data"] = [(data.train_x[:64],)]
    if mode in ("plain", "stop", "resume"):
        settings["schedules"] = [SignalRankZero(5 if mode == "stop" else None)]
    try:
        history = qcompile.train(qm, (data.train_x[:256], data.train_y[:256]),
                                 (data.test_x[:101], data.test_y[:101]), **settings)
    except TrainingInterrupted as stopped:
        torch.save({"message": str(stopped)}, os.path.join(out, f"{mode}-rank{rank}.pt"))
        raise SystemExit(3) from None
    torch.save({"initial": initial, "final": qm.state_dict(), "teacher": teacher.state_dict(),
                "records": history.records, "initial_val_accuracy": history.initial_val_accuracy},
               os.path.join(out, f"{mode}-rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
