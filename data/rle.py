"""Run-length encodings of binary masks, the two conventions the supported datasets use.

Both walk the pixels in column-major order (top to bottom, then left to right: pixel
(row r, column c) of an HxW mask has flat index ``c * H + r``), as Kaggle's competitions do.

- SIIM (``siim_rle_*``): pairs ``offset length`` where each offset counts the pixels from the
  end of the previous run (the first one from pixel 0, 0-based); an empty mask is ``"-1"``.
  Several rows for one image are a union of regions (OR, never a sum).
- Absolute (``rle_*``, Kaggle's usual format): pairs ``start length`` with 1-based starts;
  an empty mask is the empty string.

Decoders accept surrounding whitespace (the SIIM CSV has `` -1``) and raise
``data.errors.DataError`` for malformed text with a message that does not name a file, so the
caller can prefix it with ``path:line``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from data.errors import DataError

SIIM_EMPTY = "-1"


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _parse_pairs(text: str) -> tuple[np.ndarray, np.ndarray]:
    """The (first, length) integer pairs of an RLE string, validated but not yet placed."""
    tokens = text.split()
    if len(tokens) % 2:
        raise DataError(f"RLE has an odd number of values ({len(tokens)}): they must come in pairs")
    for token in tokens:
        if not (token.isascii() and token.isdigit()):
            kind = "negative" if token.startswith("-") else "non-integer"
            raise DataError(f"RLE has a {kind} value {token[:20]!r}")
    # Python ints first: a 40-digit token must be reported as an overflow, not wrap around.
    values = [int(token) for token in tokens]
    if values and max(values) > np.iinfo(np.int64).max // 4:
        raise DataError(f"RLE value {max(values)} is too large for any image")
    array = np.array(values, dtype=np.int64).reshape(-1, 2)
    return array[:, 0], array[:, 1]


def _check_shape(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise DataError(f"mask size must be positive, got {height}x{width}")


def _paint_runs(starts: np.ndarray, lengths: np.ndarray, height: int, width: int) -> np.ndarray:
    """Set the runs [start, start + length) of a column-major flat mask; overlaps stay 1."""
    total = height * width
    ends = starts + lengths
    if ends.size and int(ends.max()) > total:
        worst = int(np.argmax(ends))
        raise DataError(
            f"RLE run {worst + 1} ends at pixel {int(ends[worst])}, beyond the {height}x{width} image ({total} pixels)"
        )
    # Column-major flat = rows of the transposed mask; a slice per run is the fastest fill
    # (a few hundred runs per mask) and painting twice is harmless, so overlaps are a union.
    transposed = np.zeros((width, height), dtype=np.uint8)
    flat = transposed.reshape(-1)
    for start, end in zip(starts.tolist(), ends.tolist()):
        flat[start:end] = 1
    return transposed.T


RUN_CHUNK = 1 << 22  # pixels examined at a time by _runs


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based starts and lengths of the runs of non-zero pixels, column-major.

    A block of whole columns at a time (about RUN_CHUNK pixels), where a run starts or ends
    at each change of value: memory follows the block and the number of runs, not the mask (a
    list of every foreground pixel would take 8 bytes per pixel)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"a mask must be 2-D, got shape {mask.shape}")
    height, width = mask.shape
    columns = max(1, RUN_CHUNK // max(1, height))
    starts, ends = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    previous = False  # the value of the pixel before the block, in column-major order
    for left in range(0, width, columns):
        flat = (mask[:, left : left + columns].T != 0).reshape(-1)  # this block in column-major order
        changes = np.flatnonzero(np.diff(flat, prepend=previous))
        opening = flat[changes]
        starts.append(changes[opening] + left * height)
        ends.append(changes[~opening] + left * height)
        previous = bool(flat[-1]) if flat.size else previous
    if previous:
        ends.append(np.array([height * width], dtype=np.int64))
    first, last = np.concatenate(starts).astype(np.int64), np.concatenate(ends).astype(np.int64)
    return first, last - first


def _join(first: np.ndarray, lengths: np.ndarray) -> str:
    pairs = np.stack([first, lengths], axis=1).reshape(-1)
    return " ".join(map(str, pairs.tolist()))


# --------------------------------------------------------------------------------------------
# SIIM: relative offsets, "-1" empty
# --------------------------------------------------------------------------------------------


def siim_rle_decode(text: str, height: int, width: int) -> np.ndarray:
    """uint8 0/1 mask (height x width) of one SIIM EncodedPixels string."""
    _check_shape(height, width)
    text = text.strip()
    if text == SIIM_EMPTY:
        return np.zeros((height, width), dtype=np.uint8)
    if not text:
        raise DataError("EncodedPixels is empty (an empty mask is written -1)")
    offsets, lengths = _parse_pairs(text)
    # Run k starts after all earlier offsets and runs: cumulative sums place it absolutely.
    starts = np.cumsum(offsets) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return _paint_runs(starts, lengths, height, width)


def siim_rle_decode_rows(texts: Iterable[str], height: int, width: int) -> np.ndarray:
    """Union (OR) of several SIIM rows of one image: each row is one region."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for text in texts:
        mask |= siim_rle_decode(text, height, width)
    return mask


def siim_rle_is_empty(text: str) -> bool:
    """True when a valid SIIM string encodes no pixel ("-1", or only zero-length runs)."""
    text = text.strip()
    return text == SIIM_EMPTY or int(_parse_pairs(text)[1].sum()) == 0


def siim_rle_encode(mask: np.ndarray) -> str:
    """SIIM EncodedPixels of a mask (non-zero = foreground); "-1" when it is empty."""
    starts, lengths = _runs(mask)
    if not starts.size:
        return SIIM_EMPTY
    previous_ends = np.concatenate([[0], (starts + lengths)[:-1]])
    return _join(starts - previous_ends, lengths)


# --------------------------------------------------------------------------------------------
# Absolute: 1-based starts, "" empty
# --------------------------------------------------------------------------------------------


def rle_decode(text: str, height: int, width: int) -> np.ndarray:
    """uint8 0/1 mask of an absolute RLE string (1-based starts, column-major, "" empty).

    Overlapping runs are a union, as in the SIIM decoder.
    """
    _check_shape(height, width)
    starts, lengths = _parse_pairs(text.strip())
    if starts.size and int(starts.min()) < 1:
        raise DataError("RLE start 0: absolute starts are 1-based")
    return _paint_runs(starts - 1, lengths, height, width)


def rle_encode(mask: np.ndarray) -> str:
    """Absolute RLE of a mask (non-zero = foreground): 1-based starts, "" when empty."""
    starts, lengths = _runs(mask)
    return _join(starts + 1, lengths) if starts.size else ""
