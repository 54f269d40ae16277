"""A user's image files (any format Pillow reads, and DICOM) -> the 8-bit pixels the layout stores.

One reader, :func:`read_image_file`, so that a bound on the decoded size (decompression bombs)
or another format is added in one place. The rules, as `wss predict` reads its inputs:

- DICOM (by its "DICM" magic, whatever the suffix): :func:`data.dicom.read_dicom` (VOI window,
  MONOCHROME1 inverted, 12/16 bits stretched).
- Pillow: the image turned as it is displayed (EXIF orientation applied). Grayscale deeper than
  8 bits (16-bit PNG/TIFF, 32-bit integer or float TIFF) is stretched from its own minimum to its
  maximum (:func:`data.nih.to_grayscale`): scaling the nominal range would leave 12-bit data in
  16-bit files nearly black. 1-bit and 8-bit grayscale stay grayscale; alpha is dropped, not
  composited (the colour under it is what was imaged); palette, CMYK and other colour modes become
  RGB. A multi-frame file (a TIFF stack, an animation) is refused: which frame is the image?
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from data.dicom import dicom_shape, is_dicom, read_dicom
from data.errors import DataError
from data.images import open_image
from data.nih import to_grayscale

DICOM_SUFFIXES = {".dcm", ".dicom"}
_ORIENTATION = 0x0112
_TURNED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def image_suffixes() -> set[str]:
    """The file suffixes Pillow opens (lower case), plus DICOM's."""
    Image.init()
    readable = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return readable | DICOM_SUFFIXES


def read_image_file(path: str | Path) -> np.ndarray:
    """uint8 (H, W) for grayscale, (H, W, 3) for colour, as displayed; DataError naming the file."""
    path = Path(path)
    if is_dicom(path):
        return read_dicom(path)
    try:
        with open_image(path) as image:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise DataError(f"{path}: holds {frames} frames (a stack or an animation), not one image")
            image = ImageOps.exif_transpose(image)
            if image.mode == "P":
                return np.array(image.convert("RGB"))
            if len(image.getbands()) == 1:
                return to_grayscale(image)
            if image.mode == "LA":
                return np.array(image.getchannel("L"))
            return np.array(image.convert("RGB"))
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = "file not found" if not path.is_file() else f"cannot decode image ({error})"
        raise DataError(f"{path}: {reason}") from None


def image_file_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file as displayed, from its header alone (DICOM: Rows and
    Columns; Pillow: its size, swapped when the EXIF orientation turns it)."""
    path = Path(path)
    if is_dicom(path):
        height, width = dicom_shape(path)
        return width, height
    try:
        with open_image(path) as image:
            width, height = image.size
            turned = image.getexif().get(_ORIENTATION) in _TURNED
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot decode image ({error})") from None
    return (height, width) if turned else (width, height)
