"""Tests of the bit-packed weight layout: round trip, zero padding, the layout bit by bit, sizes."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcompile.errors import IntegerizeError
from qcompile.packing import WORD_BITS, pack_bits, packed_bytes, unpack_bits

INTEGER_DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, np.uint64]


@st.composite
def packing_cases(draw):
    """(codes, bits, axis): integer codes of 1-4 dims, the packed axis often not a multiple of 32."""
    bits = draw(st.integers(1, 8))
    ndim = draw(st.integers(1, 4))
    axis = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[axis] = draw(st.sampled_from([1, 31, 32, 33, 65]) | st.integers(1, 100))
    dtype = draw(st.sampled_from([d for d in INTEGER_DTYPES if np.iinfo(d).max >= 2**bits - 1]))
    codes = draw(hnp.arrays(dtype, tuple(shape), elements=st.integers(0, 2**bits - 1)))
    return codes, bits, axis


def bit_of_each_element(words: np.ndarray, count: int) -> np.ndarray:
    """``(bits, *rest, count)`` 0/1 array: element ``k`` read from word ``k // 32``, bit ``k % 32``."""
    k = np.arange(count)
    return (words[..., k // WORD_BITS] >> (k % WORD_BITS).astype(np.uint32)) & 1


@settings(max_examples=50, deadline=None)
@given(packing_cases(), st.booleans())
def test_unpack_inverts_pack(case, as_torch):
    codes, bits, axis = case
    n = codes.shape[axis]
    source = torch.from_numpy(codes.astype(np.int64)) if as_torch else codes
    words = pack_bits(source, bits, axis)
    rest = tuple(np.delete(np.array(codes.shape), axis % codes.ndim))
    assert words.dtype == np.uint32
    assert words.shape == (bits, *rest, -(-n // WORD_BITS))
    restored = unpack_bits(words, bits, n, axis)
    assert restored.dtype == np.int64
    np.testing.assert_array_equal(restored, codes.astype(np.int64))


@settings(max_examples=50, deadline=None)
@given(packing_cases())
def test_layout_matches_definition(case):
    codes, bits, axis = case
    along_last = np.moveaxis(codes.astype(np.int64), axis, -1)
    plane_index = np.arange(bits).reshape((bits,) + (1,) * along_last.ndim)
    expected_bits = (along_last[None] >> plane_index) & 1
    words = pack_bits(codes, bits, axis)
    np.testing.assert_array_equal(bit_of_each_element(words, codes.shape[axis]), expected_bits)


@settings(max_examples=50, deadline=None)
@given(packing_cases())
def test_padding_bits_are_zero(case):
    codes, bits, axis = case
    n = codes.shape[axis]
    words = pack_bits(codes, bits, axis)
    used = n % WORD_BITS
    if used:
        assert not np.any(words[..., -1] >> np.uint32(used))
    assert bit_of_each_element(words, words.shape[-1] * WORD_BITS)[..., n:].sum() == 0


@settings(max_examples=50, deadline=None)
@given(packing_cases())
def test_packed_bytes_matches_pack_bits(case):
    codes, bits, axis = case
    assert packed_bytes(codes.shape, bits, axis) == pack_bits(codes, bits, axis).nbytes


def test_known_small_example():
    words = pack_bits(np.array([1, 2, 3]), 2)
    np.testing.assert_array_equal(words, np.array([[0b101], [0b110]], dtype=np.uint32))


def test_element_32_starts_the_second_word():
    codes = np.zeros(40, dtype=np.int64)
    codes[[0, 32, 39]] = 1
    np.testing.assert_array_equal(pack_bits(codes, 1), np.array([[1, 1 | 1 << 7]], np.uint32))


def test_conv_weight_packs_along_input_channels():
    weight = torch.randint(0, 4, (6, 40, 3, 3), generator=torch.Generator().manual_seed(0))
    words = pack_bits(weight, 2, axis=1)
    assert words.shape == (2, 6, 3, 3, 2)
    assert words.flags.c_contiguous
    one_filter_tap = weight[4, :, 2, 1].numpy()
    np.testing.assert_array_equal(words[:, 4, 2, 1], pack_bits(one_filter_tap, 2))
    np.testing.assert_array_equal(unpack_bits(words, 2, 40, axis=1), weight.numpy())


@pytest.mark.parametrize(
    ("codes", "bits", "axis", "message"),
    [
        (np.array([0, 4]), 2, -1, r"\[0, 3\]"),
        (np.array([-1, 0]), 2, -1, r"\[0, 3\]"),
        (np.array([256], dtype=np.int64), 8, -1, r"\[0, 255\]"),
        (np.array([0.0, 1.0]), 2, -1, "integer codes"),
        (torch.tensor([True, False]), 1, -1, "integer codes"),
        ([0, 1], 1, -1, "numpy array"),
        (np.array([0, 1]), 0, -1, "from 1 to 8"),
        (np.array([0, 1]), 9, -1, "from 1 to 8"),
        (np.array([0, 1]), 2.0, -1, "from 1 to 8"),
        (np.zeros((2, 3), dtype=np.int64), 2, 2, r"\[-2, 2\)"),
        (np.zeros((2, 3), dtype=np.int64), 2, -3, r"\[-2, 2\)"),
        (np.array(1), 1, 0, "at least one dimension"),
    ],
)
def test_pack_bits_rejects_bad_input(codes, bits, axis, message):
    with pytest.raises(IntegerizeError, match=message):
        pack_bits(codes, bits, axis)


GOOD_WORDS = pack_bits(np.arange(70).reshape(2, 35) % 8, 3)


@pytest.mark.parametrize(
    ("words", "bits", "count", "axis", "message"),
    [
        (GOOD_WORDS.astype(np.int32), 3, 35, -1, "uint32"),
        (GOOD_WORDS.astype(np.uint64), 3, 35, -1, "uint32"),
        (GOOD_WORDS, 2, 35, -1, r"bits=2"),
        (GOOD_WORDS, 3, 65, -1, r"words=3"),
        (GOOD_WORDS, 3, 31, -1, r"words=1"),
        (GOOD_WORDS[0, 0], 3, 35, -1, "shape"),
        (GOOD_WORDS, 3, -1, -1, "non-negative integer count"),
        (GOOD_WORDS, 3, 35.0, -1, "non-negative integer count"),
        (GOOD_WORDS, 9, 35, -1, "from 1 to 8"),
        (GOOD_WORDS, 3, 35, 2, r"\[-2, 2\)"),
    ],
)
def test_unpack_bits_rejects_words_that_do_not_fit(words, bits, count, axis, message):
    with pytest.raises(IntegerizeError, match=message):
        unpack_bits(words, bits, count, axis)


@pytest.mark.parametrize(
    ("shape", "bits", "axis", "message"),
    [
        ((4, 3), 0, -1, "from 1 to 8"),
        ((4, 3), 2, 2, r"\[-2, 2\)"),
        ((4, -3), 2, -1, "non-negative integers"),
        ((4, 3.0), 2, -1, "non-negative integers"),
        ((), 2, 0, "at least one dimension"),
    ],
)
def test_packed_bytes_rejects_bad_arguments(shape, bits, axis, message):
    with pytest.raises(IntegerizeError, match=message):
        packed_bytes(shape, bits, axis)
