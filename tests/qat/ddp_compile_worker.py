"""Run by ``torchrun`` in the compiled-training tests: train a quantized CNN compiled, under DDP.

Each rank builds its model from a different seed, so equal final weights show that DDP
synchronised the compiled training. ``python ddp_compile_worker.py OUT [switching]`` writes
``OUT/rank<R>.pt`` (the initial and final state dicts and the history records); with
``switching``, stochastic precision switches layers every step (gates, in a compiled step).
"""

import os
import sys

import torch

import qcompile
from qcompile.data import load_builtin
from qcompile.models import SmallCNN
from qcompile.qat import StochasticPrecision


def main(out: str, switching: bool) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    data = load_builtin("digits")
    torch.manual_seed(rank)
    model = SmallCNN(in_channels=1, classes=10, width=4)
    qm = qcompile.quantize(model, (data.train_x[:1],), bits=4, method="lsq",
                           calib_data=[(data.train_x[:64],)])
    initial = {k: v.clone() for k, v in qm.state_dict().items()}
    history = qcompile.train(qm, (data.train_x[:256], data.train_y[:256]),
                             (data.test_x[:101], data.test_y[:101]), epochs=2, batch_size=32,
                             lr=5e-3, progress=False, compile=True,
                             schedules=[StochasticPrecision(start=0.4)]
                             if switching else None)
    torch.save({"initial": initial, "final": qm.state_dict(), "records": history.records,
                "initial_val_accuracy": history.initial_val_accuracy},
               os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] == ["switching"])
