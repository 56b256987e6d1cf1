"""The built-in rewrite passes, one per module; importing this package registers them.

Installed as ``qcompile.passes``. Each module registers its pass with
``@qcompile.pipeline.register_pass``; the presets below name the usual pipelines.
"""

from qcompile.pipeline import register_preset
from qcompile.passes import assign_bits, canonicalize, fold_bn  # noqa: F401

register_preset("default", ["canonicalize", "fold-bn"])
register_preset("qat", ["canonicalize", "fold-bn{mode=qat}"])
