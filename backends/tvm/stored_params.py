"""Parameters an artifact stores smaller than the kernels read them, rebuilt when it loads.

An AMX conv reads its weight as int8 bytes, zero-padded and interleaved
(:func:`.kernels.amx.pack_weight`): 8 bits a weight, four times what 2-bit codes need, and more
where channels are padded. The artifact stores the layer's packed codes and level table instead
(:class:`AmxWeight`, the integer program's own form, ``bits`` per weight) and the manifest the
recipe; :func:`from_recipe` and :meth:`AmxWeight.array` make the kernel's array again when the
module is loaded.
"""

from dataclasses import dataclass

import numpy as np

from qcompile.backends.tvm.kernels import amx
from qcompile.errors import ArtifactError
from qcompile.packing import unpack_bits


@dataclass(frozen=True, eq=False)
class AmxWeight:
    """A conv weight of ``shape`` (K, C, kh, kw): codes packed as ``words``
    (:func:`qcompile.packing.pack_bits` along C) standing for ``levels[k, code]``, read by the
    kernel in the layout of ``padded_channels`` and ``padded_out_channels``."""

    bits: int
    shape: tuple[int, ...]
    words: np.ndarray
    levels: np.ndarray
    padded_channels: int
    padded_out_channels: int

    def array(self) -> np.ndarray:
        """The int8 array the AMX kernel reads."""
        codes = unpack_bits(self.words, self.bits, self.shape[1], axis=1)
        rows = np.take_along_axis(self.levels.astype(np.int64),
                                  codes.reshape(self.shape[0], -1), axis=1)
        return amx.pack_weight(rows.reshape(self.shape).astype(np.int8), self.padded_channels,
                               self.padded_out_channels)

    def stored(self) -> dict[str, np.ndarray]:
        return {"words": self.words, "levels": self.levels}

    def recipe(self) -> dict:
        return {"kind": "amx_weight", "bits": self.bits, "shape": list(self.shape),
                "padded_channels": self.padded_channels,
                "padded_out_channels": self.padded_out_channels}


def from_recipe(recipe: dict, arrays: dict[str, np.ndarray]) -> AmxWeight:
    """The stored form a manifest ``recipe`` and the arrays saved for it describe."""
    if recipe.get("kind") != "amx_weight":
        raise ArtifactError(f"unknown stored parameter {recipe.get('kind')!r}: compile the "
                            "model again")
    return AmxWeight(int(recipe["bits"]), tuple(recipe["shape"]), arrays["words"],
                     arrays["levels"], int(recipe["padded_channels"]),
                     int(recipe["padded_out_channels"]))
