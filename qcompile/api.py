"""The one-call entry points of the public API."""

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.utils.data import Dataset

from qcompile.errors import ConfigError
from qcompile.ir import trace
from qcompile.ir.trace import example_tuple
from qcompile.pipeline import PassContext, PassManager, PassSpec
from qcompile.quant.calibration import CalibrationData

SINGLE_READ = (torch.Tensor, np.ndarray, Dataset)
"""``calib_data`` that every pass reads alike as it is (one batch, or a dataset batched in
order); any other iterable is read once through :class:`CalibrationData`."""


def quantize(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    bits: int = 2,
    method: str = "qil",
    calib_data: Iterable | None = None,
    first_last_bits: int = 8,
    first_last_method: str | None = None,
    per_channel: bool = True,
    passes: str | Sequence[str | PassSpec] | None = None,
    budget: dict | None = None,
    leaf_modules: Iterable = (),
    ctx: PassContext | None = None,
) -> fx.GraphModule:
    """Trace ``model`` and rewrite it into a trainable quantized graph (still float).

    Runs ``passes`` (default: the ``default`` preset: canonicalize, estimate-bn, fold-bn in
    QAT mode, assign-bits, insert-quantizers, quantize-boundaries). ``budget`` switches
    assign-bits to its sensitivity policy: ``{"size": 0.1}`` (fraction of fp32 weight bytes)
    or ``{"bops": 0.02}``, with optional ``"bits_choices": "2,3,4,8"``. ``calib_data``: an
    iterable of batches of model inputs (tuples or bare tensors; a ``DataLoader``'s ``(inputs,
    labels)`` batches give their inputs), read once and only as far as calibration goes, or one
    batch as a tensor, or a ``Dataset`` (:func:`~qcompile.quant.calibration.calibration_batches`).
    ``first_last_method`` quantizes the first and last layers with another method than
    ``method`` (``"lsq"``: a learned uniform step for their 8 bits); unset, they take ``method``,
    except that ``"qn"`` quantizes first and last layers of more than 4 bits with LSQ
    (``first_last_method="qn"`` keeps QN there).
    """
    config = dict(bits=bits, method=method, first_last_bits=first_last_bits,
                  per_channel=per_channel)
    if first_last_method is not None:
        config["first_last_method"] = first_last_method
    replay = None
    if calib_data is not None:
        replay = calib_data if isinstance(calib_data, SINGLE_READ) else CalibrationData(calib_data)
        config["calib_data"] = replay
    config.update(_budget_options(budget))
    example_inputs = example_tuple(example_inputs)
    gm = trace(model, example_inputs, leaf_modules=leaf_modules)
    try:
        return PassManager(passes or "default").run(gm, example_inputs, ctx=ctx, **config)
    finally:
        if isinstance(replay, CalibrationData):
            replay.close()


def _budget_options(budget: dict | None) -> dict:
    if not budget:
        return {}
    known = {"size": "budget_size", "bops": "budget_bops", "bits_choices": "bits_choices"}
    unknown = set(budget) - set(known)
    if unknown:
        raise ConfigError(f"unknown budget keys {sorted(unknown)}; use size, bops, bits_choices")
    return {known[key]: value for key, value in budget.items()}


def compile(model, target="llvm", input_shape=None):  # noqa: A001 - the public name DESIGN fixes
    """Compile a quantized graph (or an ``IntegerGraph``) with the TVM backend for ``target``
    (``"llvm"``: this CPU; ``"cuda"``, ``"cuda:sm_90"``); returns a callable ``CompiledModule``
    with ``.save(path)``. ``input_shape`` defaults to the example input's shape."""
    from qcompile.backends.tvm import compile_module

    return compile_module(model, target, input_shape)


def load(path):
    """The ``CompiledModule`` saved at ``path`` (a ``.qc`` artifact), ready to run."""
    from qcompile.backends.tvm import load as load_module

    return load_module(path)
