"""RLE codecs: the full SIIM label file round trip, known answers, errors, fuzzing."""

import csv
import gzip
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from data.errors import DataError
from data.rle import rle_decode, rle_encode, siim_rle_decode, siim_rle_decode_rows, siim_rle_encode, siim_rle_is_empty

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "samples"
FULL_CSV = SAMPLES / "siim" / "train-rle.csv.gz"

# A 3x4 mask (rows x columns); column-major order visits (0,0) (1,0) (2,0) (0,1) ...
MASK = np.array([[0, 1, 0, 0], [1, 1, 0, 1], [1, 0, 0, 1]], dtype=np.uint8)
# flat column-major: 0 1 1 | 1 1 0 | 0 0 0 | 0 1 1 -> runs at 1 (len 4) and 10 (len 2)
MASK_SIIM = "1 4 5 2"  # offset 10 - 5 = 5 from the end of the first run
MASK_ABSOLUTE = "2 4 11 2"


def test_known_answers():
    assert siim_rle_encode(MASK) == MASK_SIIM
    assert rle_encode(MASK) == MASK_ABSOLUTE
    assert np.array_equal(siim_rle_decode(MASK_SIIM, 3, 4), MASK)
    assert np.array_equal(rle_decode(MASK_ABSOLUTE, 3, 4), MASK)


def test_empty_masks():
    empty = np.zeros((5, 7), dtype=np.uint8)
    assert siim_rle_encode(empty) == "-1"
    assert rle_encode(empty) == ""
    assert not siim_rle_decode(" -1", 5, 7).any()
    assert not rle_decode("", 5, 7).any()
    assert siim_rle_is_empty(" -1") and siim_rle_is_empty("3 0") and not siim_rle_is_empty("0 1")


def test_rows_are_a_union_not_a_sum():
    first = siim_rle_decode("0 4", 2, 4)  # pixels 0-3
    second = siim_rle_decode("2 4", 2, 4)  # pixels 2-5: overlaps 2-3
    union = siim_rle_decode_rows(["0 4", "2 4", "-1"], 2, 4)
    assert union.max() == 1
    assert np.array_equal(union, first | second)
    assert union.sum() == 6


def test_decoded_mask_dtype_and_values():
    mask = siim_rle_decode(MASK_SIIM, 3, 4)
    assert mask.dtype == np.uint8 and mask.shape == (3, 4) and set(np.unique(mask)) == {0, 1}


@pytest.mark.parametrize(
    "text, message",
    [
        ("1 3 6", "odd number"),
        ("1 3 6 3", "beyond"),  # ends at pixel 13 of 12
        ("1 -3", "negative"),
        ("1 3.5", "non-integer"),
        ("1 x", "non-integer"),
        ("", "empty"),
        ("9" * 40 + " 1", "too large"),
    ],
)
def test_siim_errors(text, message):
    with pytest.raises(DataError, match=message):
        siim_rle_decode(text, 3, 4)


@pytest.mark.parametrize(
    "text, message", [("2 3 11", "odd number"), ("0 2", "1-based"), ("11 3", "beyond"), ("2 -1", "negative")]
)
def test_absolute_errors(text, message):
    with pytest.raises(DataError, match=message):
        rle_decode(text, 3, 4)


@pytest.mark.slow
def test_full_label_file_round_trips_exactly():
    """Every one of the 12,954 rows decodes and re-encodes to the identical string."""
    if not FULL_CSV.is_file():
        pytest.skip(f"SIIM label file not found: {FULL_CSV}")
    reader = csv.reader(io.StringIO(gzip.decompress(FULL_CSV.read_bytes()).decode("utf-8")))
    header = next(reader)
    assert header == ["ImageId", " EncodedPixels"]  # the leading space of the release
    rows = list(reader)
    assert len(rows) == 12954
    assert len({image_id for image_id, _ in rows}) == 12047
    mismatches = [
        (i, text) for i, (_, text) in enumerate(rows) if siim_rle_encode(siim_rle_decode(text, 1024, 1024)) != text
    ]
    assert not mismatches, f"{len(mismatches)} rows differ, first at data row {mismatches[0][0] + 1}"


masks = st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(
    lambda shape: arrays(np.uint8, shape, elements=st.integers(0, 1))
)


@settings(max_examples=150, deadline=None)
@given(masks)
def test_random_masks_round_trip_both_codecs(mask):
    height, width = mask.shape
    assert np.array_equal(siim_rle_decode(siim_rle_encode(mask), height, width), mask)
    assert np.array_equal(rle_decode(rle_encode(mask), height, width), mask)
    # The two codecs describe the same runs: their run lengths agree.
    assert siim_rle_encode(mask).split()[1::2] == rle_encode(mask).split()[1::2]


@settings(max_examples=150, deadline=None)
@given(masks)
def test_fortran_and_c_ordered_masks_encode_alike(mask):
    assert siim_rle_encode(np.asfortranarray(mask)) == siim_rle_encode(np.ascontiguousarray(mask))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789 -+.,x\t\n\u0663"), max_size=40))
def test_random_text_decodes_or_raises_data_error(text):
    for decode in (siim_rle_decode, rle_decode):
        try:
            mask = decode(text, 6, 5)
        except DataError:
            continue
        assert mask.shape == (6, 5) and mask.dtype == np.uint8


def reference_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs from the list of every foreground pixel (column-major): simple, 8 bytes a pixel."""
    on = np.flatnonzero(np.asarray(mask).T != 0)
    if not on.size:
        return on, on
    breaks = np.flatnonzero(np.diff(on) != 1) + 1
    starts = on[np.concatenate([[0], breaks])]
    last = on[np.concatenate([breaks - 1, [on.size - 1]])]
    return starts, last - starts + 1


@pytest.mark.parametrize("chunk", [1, 5, 64, 1 << 22])
def test_runs_found_block_by_block_equal_the_pixel_list(monkeypatch, chunk):
    """Runs that cross a block of columns, or fill one, are joined as in a whole-mask walk."""
    import data.rle

    monkeypatch.setattr(data.rle, "RUN_CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    masks = [np.ones((7, 5), np.uint8), np.zeros((3, 9), np.uint8), np.ones((1, 1), np.uint8), MASK]
    masks += [(rng.random(rng.integers(1, 25, 2)) < rng.random()).astype(np.uint8) * 3 for _ in range(150)]
    for mask in masks:
        starts, lengths = reference_runs(mask)
        expected = (
            "-1"
            if not starts.size
            else " ".join(
                map(str, np.stack([starts - np.concatenate([[0], (starts + lengths)[:-1]]), lengths], 1).ravel())
            )
        )
        assert siim_rle_encode(mask) == expected
        assert rle_encode(mask) == " ".join(map(str, np.stack([starts + 1, lengths], 1).ravel()))


def test_encoding_a_large_mask_takes_memory_by_the_block_not_by_the_pixel():
    """A 4000 x 4000 mask, nearly all foreground: listing its pixels would take 128 MB (and as
    much again for their differences); the block-wise walk holds a few MB."""
    import tracemalloc

    mask = np.ones((4000, 4000), np.uint8)
    mask[::97, ::89] = 0
    tracemalloc.start()
    try:
        text = siim_rle_encode(mask)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(siim_rle_decode(text, 4000, 4000), mask)
    assert peak < 40 * 2**20, f"{peak / 2**20:.0f} MiB"
