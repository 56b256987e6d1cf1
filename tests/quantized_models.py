"""Quantized test models: the small CNN on real digits, torchvision models on random images."""

import functools

import torch
import torchvision
from torch import fx

import qcompile
from batch_norms import randomize_batch_norms
from qcompile.data import load_builtin
from qcompile.ir.export_frontend import from_exported_program
from qcompile.models import SmallCNN


@functools.cache
def images(kind: str, count: int = 16) -> torch.Tensor:
    if kind == "small":
        return load_builtin("mnist5k").test_x[:count]
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def held_out(arch: str, count: int = 16) -> torch.Tensor:
    """Inputs the models were not calibrated on: the next digits, or other random images. A
    calibration can put a decision threshold exactly on a value it saw (a clipping range ending
    at the batch's largest activation), where two runtimes' rounding rules then differ; a user's
    inputs are not the calibration batch."""
    if arch == "small":
        return load_builtin("mnist5k").test_x[count:2 * count]
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def quantized(arch: str, method: str, bits: int, count: int = 16, exported: bool = False
              ) -> tuple[fx.GraphModule, torch.Tensor]:
    """``arch`` (``small`` or a torchvision name) with randomized batch norms, quantized at
    W``bits``A``bits`` (first and last layer 8-bit) and calibrated on its test batch;
    ``exported``: through ``torch.export`` and the frontend that reads its programs, as a
    ``.pt2`` file is."""
    torch.manual_seed(0)
    if arch == "small":
        model, x = SmallCNN(1, 10), images("small", count)
    else:
        model, x = getattr(torchvision.models, arch)(weights=None), images("imagenet")
    randomize_batch_norms(model, seed=bits)
    model = model.eval()
    if exported:
        model = from_exported_program(torch.export.export(model, (x[:1],)))
    qm = qcompile.quantize(model, (x[:1],), bits=bits, method=method, calib_data=[(x,)])
    return qm, x
