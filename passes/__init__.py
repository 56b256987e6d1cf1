"""The built-in rewrite passes, one per module; importing this package registers them.

Installed as ``qcompile.passes``. Each module registers its pass with
``@qcompile.pipeline.register_pass``; the presets below name the usual pipelines:

- ``default``: quantize for training: batch norms that never saw data get the statistics of
  the calibration inputs (``estimate-bn``), batch norm stays live inside the quantized layers
  (``fold-bn{mode=qat}``), bit-widths assigned, quantizers inserted and calibrated on layer
  inputs, then on the other tensors integer operations read (residual adds, concatenations,
  average pools: ``quantize-boundaries``).
- ``frozen-bn``: the same with batch norm folded exactly into the weights (its statistics frozen).
- ``float``: the float rewrites only (canonicalize, fold-bn).
"""

from qcompile.pipeline import register_preset
from qcompile.passes import assign_bits, canonicalize, estimate_bn, fold_bn  # noqa: F401
from qcompile.passes import insert_quantizers, quantize_boundaries  # noqa: F401

register_preset("default", ["canonicalize", "estimate-bn", "fold-bn{mode=qat}", "assign-bits",
                            "insert-quantizers", "quantize-boundaries"])
register_preset("frozen-bn", ["canonicalize", "estimate-bn", "fold-bn", "assign-bits",
                              "insert-quantizers", "quantize-boundaries"])
register_preset("float", ["canonicalize", "fold-bn"])
