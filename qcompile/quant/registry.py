"""The quantization methods by name: each is a weight quantizer and an activation quantizer."""

from dataclasses import dataclass

from qcompile.errors import ConfigError
from qcompile.quant.base import Quantizer


@dataclass(frozen=True)
class QuantMethod:
    """A method users name (``--method qil``): its two quantizer classes and its paper.

    ``wide_edges``: the method that quantizes the first and last layers when they are wider than
    :data:`WIDE_EDGE_BITS` (their 8 bits by default) and the user names no
    ``first_last_method``; None keeps this method there."""

    name: str
    weight: type[Quantizer]
    activation: type[Quantizer]
    paper: str
    wide_edges: str | None = None


_methods: dict[str, QuantMethod] = {}
WIDE_EDGE_BITS = 4
"""First and last layers of more bits than this may take a method's ``wide_edges`` method."""


def register_method(name: str, weight: type[Quantizer], activation: type[Quantizer], paper: str,
                    wide_edges: str | None = None):
    weight.method = activation.method = name
    _methods[name] = QuantMethod(name, weight, activation, paper, wide_edges)


def available_methods() -> list[str]:
    return sorted(_methods)


def get_method(name: str) -> QuantMethod:
    try:
        return _methods[name]
    except KeyError:
        raise ConfigError(
            f"unknown quantization method {name!r}; choose one of {', '.join(available_methods())}"
        ) from None


def make_quantizer(
    method: str,
    role: str,
    bits: int,
    *,
    signed: bool,
    per_channel: bool = False,
    channels: int = 1,
    channel_axis: int = 0,
) -> Quantizer:
    """A new quantizer of ``method`` for ``role`` ("weight" or "activation")."""
    if role not in ("weight", "activation"):
        raise ConfigError(f"quantizer role must be 'weight' or 'activation', got {role!r}")
    cls = getattr(get_method(method), role)
    return cls(bits, signed=signed, per_channel=per_channel, channels=channels,
               channel_axis=channel_axis)
