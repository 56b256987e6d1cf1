"""Learnable quantizers, one module per method; importing this package registers them all.

Methods: ``qil`` (Jung et al. 2019), ``qn`` (Yang et al. 2019), ``dq`` (Hoang et al.),
``lsq`` (Esser et al. 2020), ``pact`` (Choi et al. 2018), ``dorefa`` (Zhou et al. 2016).
"""

from qcompile.quant.base import IntegerSpec, Quantizer, replace_gradient, round_ste
from qcompile.quant.registry import (
    QuantMethod,
    available_methods,
    get_method,
    make_quantizer,
    register_method,
)
from qcompile.quant import dorefa, dq, lsq, pact, qil, qn  # noqa: E402,F401

__all__ = [
    "IntegerSpec",
    "QuantMethod",
    "Quantizer",
    "available_methods",
    "get_method",
    "make_quantizer",
    "register_method",
    "replace_gradient",
    "round_ste",
]
