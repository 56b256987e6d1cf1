"""The bit-packed layout of low-bit integer weights that the integer backends read.

A tensor of ``b``-bit unsigned codes is stored as ``b`` bit-planes of 32-bit words:

- ``pack_bits(codes, b, axis)`` returns a ``numpy.uint32`` array of shape
  ``(b, *rest_shape, words)``, where ``rest_shape`` is the codes' shape without ``axis`` (the
  other axes keep their order) and ``words = ceil(n / 32)`` for ``n = codes.shape[axis]``;
- plane ``i`` (the first axis) holds bit ``i`` of every code, plane 0 the least significant bit;
- along the packed axis, element ``k`` is bit ``k % 32`` of word ``k // 32`` (LSB-first), and
  the bits past ``n`` in the last word are zero.

Why this layout: a bit-serial kernel (Umuroglu & Jahre 2017, "Streamlined deployment for
quantized neural networks"; the TVM bit-serial operators of Cowan et al. 2020) computes a
low-bit dot product as ``sum_ij 2**(i+j) * popcount(w_i AND a_j)``, where ``w_i`` and ``a_j``
are bit-planes of the weights and activations along the reduction axis. Packing along the input
channels lets one AND and one popcount handle 32 channels at a time, and zero padding adds
nothing to the count. Planes are the outermost axis so that one plane of a whole layer is one
contiguous block, which the kernel streams once per activation plane.

For a conv weight of shape ``(C_out, C_in, kh, kw)`` the caller packs along ``axis=1`` (the input
channels), which gives ``(bits, C_out, kh, kw, words)``; a linear weight ``(out, in)`` packs
along ``axis=1`` into ``(bits, out, words)``.
"""

import math
from numbers import Integral

import numpy as np
import torch

from qcompile.errors import IntegerizeError

WORD_BITS = 32
"""Bits per packed word; element ``k`` of the packed axis is bit ``k % 32`` of word ``k // 32``."""


def pack_bits(codes, bits: int, axis: int = -1) -> np.ndarray:
    """Pack unsigned ``bits``-bit integer ``codes`` into bit-planes of 32-bit words along ``axis``.

    ``codes`` is a torch tensor or numpy array of any integer dtype with values in
    ``[0, 2**bits)``. Returns a ``numpy.uint32`` array of shape ``(bits, *rest_shape, words)``
    laid out as the module docstring describes.
    """
    _check_bits(bits)
    codes = _as_numpy(codes, "codes")
    if not np.issubdtype(codes.dtype, np.integer):
        raise IntegerizeError(
            f"pack_bits expects integer codes, got dtype {codes.dtype}; round and cast the "
            "quantized values to an integer dtype first"
        )
    axis = _normalize_axis(axis, codes.ndim)
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise IntegerizeError(
            f"pack_bits expects {bits}-bit unsigned codes in [0, {2**bits - 1}], got values in "
            f"[{codes.min()}, {codes.max()}]; offset signed codes to unsigned, or raise bits"
        )
    along_last = np.moveaxis(codes.astype(np.uint8), axis, -1)
    planes = np.unpackbits(along_last[..., None], axis=-1, count=bits, bitorder="little")
    planes = np.moveaxis(planes, -1, 0)
    n = planes.shape[-1]
    padding = [(0, 0)] * (planes.ndim - 1) + [(0, _words(n) * WORD_BITS - n)]
    packed = np.packbits(np.pad(planes, padding), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32, copy=False)


def unpack_bits(words, bits: int, count: int, axis: int = -1) -> np.ndarray:
    """The inverse of :func:`pack_bits`: ``int64`` codes with the unpacked axis at ``axis``.

    ``words`` has shape ``(bits, *rest_shape, ceil(count / 32))``; ``count`` is the length of the
    packed axis before padding. The result has ``1 + len(rest_shape)`` dimensions, the padding
    dropped.
    """
    _check_bits(bits)
    if isinstance(count, bool) or not isinstance(count, Integral) or count < 0:
        raise IntegerizeError(f"unpack_bits expects a non-negative integer count, got {count!r}")
    words = _as_numpy(words, "words")
    if words.dtype.kind != "u" or words.dtype.itemsize != 4:
        raise IntegerizeError(
            f"unpack_bits expects uint32 words as pack_bits returns them, got dtype {words.dtype}"
        )
    expected = f"(bits={bits}, *rest_shape, words={_words(count)}) for count={count}"
    if words.ndim < 2 or words.shape[0] != bits or words.shape[-1] != _words(count):
        raise IntegerizeError(
            f"unpack_bits expects words of shape {expected}, got {tuple(words.shape)}"
        )
    axis = _normalize_axis(axis, words.ndim - 1)
    as_bytes = np.ascontiguousarray(words.astype("<u4", copy=False)).view(np.uint8)
    planes = np.unpackbits(as_bytes, axis=-1, count=count, bitorder="little")
    codes = np.packbits(np.moveaxis(planes, 0, -1), axis=-1, bitorder="little")[..., 0]
    return np.moveaxis(codes.astype(np.int64), -1, axis)


def packed_bytes(shape, bits: int, axis: int = -1) -> int:
    """Bytes :func:`pack_bits` produces for codes of ``shape``, computed without packing."""
    _check_bits(bits)
    shape = tuple(shape)
    if any(isinstance(d, bool) or not isinstance(d, Integral) or d < 0 for d in shape):
        raise IntegerizeError(f"packed_bytes expects a shape of non-negative integers, got {shape}")
    axis = _normalize_axis(axis, len(shape))
    rest = shape[:axis] + shape[axis + 1 :]
    return bits * math.prod(rest) * _words(shape[axis]) * (WORD_BITS // 8)


def _words(count: int) -> int:
    return -(-count // WORD_BITS)


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, Integral) or not 1 <= bits <= 8:
        raise IntegerizeError(f"bits must be an integer from 1 to 8, got {bits!r}")


def _as_numpy(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    if not isinstance(values, np.ndarray):
        raise IntegerizeError(
            f"{name} must be a torch tensor or numpy array, got {type(values).__name__}"
        )
    return values


def _normalize_axis(axis, ndim: int) -> int:
    if ndim == 0:
        raise IntegerizeError("packing needs codes with at least one dimension, got a scalar")
    if isinstance(axis, bool) or not isinstance(axis, Integral) or not -ndim <= axis < ndim:
        raise IntegerizeError(
            f"axis must be an integer in [{-ndim}, {ndim}) for {ndim}-dimensional codes, "
            f"got {axis!r}"
        )
    return int(axis) % ndim
