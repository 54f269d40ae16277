"""Opening image files with a bound on their size, in wss's words.

A small file can claim a huge image (a PNG of one colour compresses 1000:1): decoding it takes
memory in proportion to its pixels, not its bytes. Every reader of user images opens them here:
the header is read first and an image of more than `max_pixels` pixels is refused with one line
naming the file, before any pixel is decoded. Pillow's own guard (a DecompressionBombWarning
printed raw from 89 megapixels, an error from 179) is off while a file is open here, so that
the bound is wss's alone and the user never sees Pillow's message.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from data.errors import DataError

# The largest image accepted, in pixels (16384 x 16384). Decoding one costs about 4 bytes per
# pixel for colour (Pillow stores RGB in 32 bits) and 1 for 8-bit grayscale: about 1 GiB at the
# bound. `wss predict --max-pixels` sets another bound for one run.
MAX_IMAGE_PIXELS = 16384 * 16384


class ImageTooLargeError(DataError):
    """An image with more pixels than the accepted bound."""


def check_pixels(where: str | Path, width: int, height: int, max_pixels: int | None = None, hint: str = "") -> None:
    """ImageTooLargeError naming `where` when width x height exceeds `max_pixels` (None:
    MAX_IMAGE_PIXELS); `hint` says which setting moves the bound, where there is one."""
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{where}: image of {width}x{height} pixels ({width * height / 1e6:.1f} megapixels) is larger than "
            f"the {max_pixels} pixels accepted{f' ({hint})' if hint else ''}"
        )


@contextmanager
def open_image(path: str | Path, max_pixels: int | None = None, hint: str = "") -> Iterator[Image.Image]:
    """`Image.open(path)` whose size is checked against `max_pixels` (None: MAX_IMAGE_PIXELS)
    before anything is decoded.

    Decode inside the `with` block (load(), convert(), np.array()): Pillow checks some formats'
    frame sizes again while decoding, and its check stays off until the block ends. Pillow's
    errors for unreadable files (OSError, ValueError, SyntaxError) pass through to the caller.
    """
    with _pillow_guard_off():
        with Image.open(path) as image:
            check_pixels(path, image.width, image.height, max_pixels, hint)
            yield image


@contextmanager
def _pillow_guard_off() -> Iterator[None]:
    """Pillow's decompression-bomb check off (its limit is a module global; restored after):
    `open_image` applies wss's own bound instead."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved
