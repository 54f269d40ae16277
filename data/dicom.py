"""Read a DICOM radiograph into the 8-bit grayscale image that the pipeline trains on.

Conversion to 8 bits, in order:
1. the stored values go through the Modality LUT (Rescale Slope/Intercept) when present;
2. a VOI transform, when the file has one, sets the displayed range as the radiologist saw it:
   a VOI LUT Sequence (its output is then stretched to 0-255) or else the first
   Window Center/Width pair (the DICOM linear window, mapped to 0-255);
3. without a VOI transform, an image stored in at most 8 bits (BitsStored <= 8, like the SIIM
   JPEGs) keeps its values exactly; a deeper one (12 or 16 bits) is stretched from its own
   minimum to its maximum, because many 12-bit images are stored in 16 bits and scaling the
   nominal 0..2**BitsStored-1 range would leave them nearly black;
4. MONOCHROME1 (0 = white) is inverted so that air is dark in every prepared image.

Colour files (rare for radiographs) are converted to luminance; multi-frame files are refused.
Every failure (not a DICOM, truncated, no pixel data, an undecodable codec) is a DataError
naming the file. pydicom reads a file cut short without an error (it keeps the elements it
found, the last one shorter than its stated length); a file that fails to read and shows such an
end is reported as truncated, not as one without pixel data (a file that reads well is never
refused for how it ends).
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.images import check_pixels

DICOM_MAGIC = b"DICM"
_PREAMBLE = 128


def is_dicom(path: str | Path) -> bool:
    """True when the file has the DICOM Part 10 preamble and the "DICM" magic."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_PREAMBLE + len(DICOM_MAGIC))
    except OSError:
        return False
    return head[_PREAMBLE:] == DICOM_MAGIC


def read_dicom(path: str | Path, max_pixels: int | None = None, hint: str = "") -> np.ndarray:
    """The image of a single-frame DICOM file as uint8 HxW (see the module doc for the mapping).
    An image of more than `max_pixels` pixels (Rows x Columns; None: data.images.MAX_IMAGE_PIXELS)
    is refused before its pixel data is decoded (a DataError; `hint` names the setting that
    moves the bound)."""
    # pydicom warns (instead of failing) about damaged files; the warnings explain a failure
    # better than the error that follows, and are otherwise noise on the progress bar.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        truncated = None
        try:
            dataset = _read_dataset(Path(path))
            truncated = _truncation_or_none(dataset, Path(path), caught)  # before decoding converts elements
            if not _has_pixels(dataset):
                raise DataError(f"{path}: the DICOM file has no pixel data")
            _check_size(dataset, path, max_pixels, hint)
            pixels = _decode_pixels(dataset, path)
            return _mapped(pixels, dataset, path)
        except DataError as error:
            # said only for a file that failed: one that reads well is never refused for its end
            if truncated:
                raise DataError(f"{path}: the DICOM file is truncated{truncated}") from None
            if caught:
                raise DataError(f"{error} (pydicom: {_first_line(caught[0].message)})") from None
            raise


def dicom_shape(path: str | Path) -> tuple[int, int]:
    """(height, width) of a single-frame DICOM from its header alone (Rows, Columns): the shape
    its mask is decoded at when its pixels need not be read again."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
            rows, columns = int(dataset.Rows), int(dataset.Columns)
    except Exception as error:  # pydicom raises many types for damaged headers; all mean the same
        raise DataError(f"{path}: not a readable DICOM header ({_describe(error)})") from None
    if rows <= 0 or columns <= 0:
        raise DataError(f"{path}: the DICOM header gives an empty image ({columns}x{rows})")
    return rows, columns


def _truncation_or_none(dataset, path: Path, caught) -> str | None:
    try:
        return _truncation(dataset, path, caught)
    except Exception:  # pydicom parses lazily: a damaged dataset may fail anywhere, any type
        return None


def _truncation(dataset, path: Path, caught) -> str | None:
    """How a file that failed to read was cut short, or None without evidence of it. pydicom reads
    a truncated file without an error: it warns when the file ends inside an element of undefined
    length (encapsulated pixel data, sequences), keeps an element cut inside its value with fewer
    bytes than its stated length, and drops an element cut inside its own header."""
    from pydicom.dataelem import RawDataElement

    for warning in caught:
        if "end of file" in str(warning.message).lower():
            return f" (pydicom: {_first_line(warning.message)})"
    size = path.stat().st_size
    tags = sorted(dataset.keys())
    for tag in tags:
        element = dataset.get_item(tag)  # the raw element, as read: its stated length is kept
        if (
            isinstance(element, RawDataElement)
            and element.length != 0xFFFFFFFF
            and len(element.value or b"") < element.length
        ):
            return f": it ends inside element {tag} ({len(element.value or b'')} of its {element.length} bytes)"
    meta = getattr(dataset, "file_meta", None)
    try:
        group_length = meta.get("FileMetaInformationGroupLength") if meta else None
    except Exception:  # a damaged element fails when converted, any type: no evidence either way
        group_length = None
    if group_length is not None and (
        not isinstance(group_length, int) or size < _PREAMBLE + len(DICOM_MAGIC) + 12 + group_length
    ):
        return ": it ends inside its file meta header"
    if not tags:
        return f": nothing follows its {'file meta header' if meta else 'DICM prefix'}"
    last = dataset.get_item(tags[-1])
    if (
        isinstance(last, RawDataElement)
        and last.length != 0xFFFFFFFF
        and last.value_tell is not None
        and size > last.value_tell + last.length
    ):
        return f": it ends inside the element after {tags[-1]}"
    return None


def _has_pixels(dataset) -> bool:
    try:
        return "PixelData" in dataset
    except Exception:  # pydicom parses lazily: a damaged dataset may fail here, any type
        return False


def _first_line(message) -> str:
    return str(message).splitlines()[0] if str(message) else ""


def _mapped(pixels: np.ndarray, dataset, path) -> np.ndarray:
    try:
        return to_uint8(pixels, dataset)
    except Exception as error:  # pydicom parses elements lazily: a damaged one fails here, any type
        raise DataError(f"{path}: cannot map the pixel values to 8 bits ({_describe(error)})") from None


def _read_dataset(path: Path):
    import pydicom

    if not path.is_file():
        raise DataError(f"{path}: DICOM file not found")
    try:
        dataset = pydicom.dcmread(path)
        dataset.keys()
    except struct.error as error:  # an element header cut short: "unpack requires a buffer of 4 bytes"
        raise DataError(f"{path}: the DICOM file is truncated ({_describe(error)})") from None
    except Exception as error:  # pydicom raises many types for damaged headers; all mean the same
        raise DataError(f"{path}: not a readable DICOM file ({_describe(error)})") from None
    return dataset


def _check_size(dataset, path, max_pixels: int | None, hint: str) -> None:
    """Refuse a multi-frame file or an image over `max_pixels` from the header, before decoding
    the pixel data (which pydicom does whole, at 2 bytes or more per pixel and frame)."""
    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    except Exception:  # noqa: BLE001 - a damaged element fails when converted, any type (pydicom raises
        return  # NotImplementedError for an unknown value representation): _decode_pixels says what is wrong
    if frames > 1:
        raise DataError(f"{path}: multi-frame DICOM ({frames} frames) is not a radiograph")
    check_pixels(path, columns, rows, max_pixels, hint)


def _decode_pixels(dataset, path) -> np.ndarray:
    try:
        pixels = dataset.pixel_array
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except Exception as error:  # truncated data, codec errors, damaged elements: all unreadable
        raise DataError(f"{path}: cannot decode the DICOM pixel data ({_describe(error)})") from None
    if frames > 1:
        raise DataError(f"{path}: multi-frame DICOM ({frames} frames) is not a radiograph")
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        # rounded: the weights sum to 1 only up to float error, and a later cast to uint8
        # truncates, so gray (v, v, v) would otherwise come out as v - 1 on many levels
        pixels = np.rint(pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
    if pixels.ndim != 2 or 0 in pixels.shape:
        raise DataError(f"{path}: expected a 2-D image, got pixel array of shape {pixels.shape}")
    return pixels


def _describe(error: Exception) -> str:
    message = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def to_uint8(pixels: np.ndarray, dataset) -> np.ndarray:
    """Map decoded pixel values to 0-255 following the module doc (exposed for tests)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = pixels
    if dataset.get("ModalityLUTSequence"):
        values = apply_modality_lut(values, dataset)
    elif _has_modality_transform(dataset):
        values = _rescale(values, dataset)
    window = _window_tags(dataset)
    if "VOILUTSequence" in dataset:
        image = stretch_to_uint8(apply_voi_lut(values, dataset, prefer_lut=True))
    elif window is not None:
        image = _window(values, *window)
    elif int(dataset.get("BitsStored", 8) or 8) <= 8 and values is pixels and pixels.min() >= 0:
        image = np.clip(pixels, 0, 255).astype(np.uint8)
    else:
        image = stretch_to_uint8(values)
    if str(dataset.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        image = 255 - image
    return image


def _has_modality_transform(dataset) -> bool:
    """A Modality LUT, or a rescale other than the identity (slope 1, intercept 0).

    Many 8-bit files carry an identity rescale; applying it would make them look rescaled and
    lose the "8-bit values are kept" rule. Empty tags count as their defaults.
    """
    if dataset.get("ModalityLUTSequence"):
        return True
    slope, intercept = _rescale_tags(dataset)
    return slope != 1.0 or intercept != 0.0


def _rescale(values: np.ndarray, dataset) -> np.ndarray:
    """values * slope + intercept, computed here rather than by pydicom's apply_modality_lut,
    which multiplies by None when a tag is present but empty (and ignores a lone tag)."""
    slope, intercept = _rescale_tags(dataset)
    return values.astype(np.float64) * slope + intercept


def _rescale_tags(dataset) -> tuple[float, float]:
    """(Rescale Slope, Rescale Intercept), an absent or empty tag giving its default 1 or 0."""
    slope, intercept = dataset.get("RescaleSlope"), dataset.get("RescaleIntercept")
    return 1.0 if _empty(slope) else float(slope), 0.0 if _empty(intercept) else float(intercept)


def _window_tags(dataset) -> tuple[float, float] | None:
    """(center, width) of the first Window Center/Width pair, or None when either tag is absent
    or empty (some writers leave them blank: that is no window, not a broken file)."""
    center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if _empty(center) or _empty(width):
        return None
    return _first(center), _first(width)


def _empty(value) -> bool:
    if value is None or (isinstance(value, str) and not value.strip()):
        return True
    return not isinstance(value, (int, float, str)) and (len(value) == 0 or _empty(value[0]))


def _first(value) -> float:
    """Window Center/Width may hold several alternatives; the first is the default view."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 linear window, output 0-255."""
    if width <= 1.0:  # a degenerate window is a threshold at its center
        return np.where(values >= center, 255, 0).astype(np.uint8)
    scaled = (values.astype(np.float64) - (center - 0.5)) / (width - 1.0) + 0.5
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


STRETCH_CHUNK = 1 << 20  # values mapped at a time: float64 work arrays of 8 MiB, whatever the image size


def stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Linear map of the image's own min..max to 0..255 (a constant image becomes 0).

    Computed in float64 a chunk of rows at a time: a copy of a large image in float64 would
    take 8 bytes per pixel, several times over."""
    values = np.asarray(values)
    low, high = float(values.min()), float(values.max())  # exact in float64 for every input dtype
    out = np.zeros(values.shape, dtype=np.uint8)
    if high <= low:
        return out
    scale = 255.0 / (high - low)
    rows = max(1, STRETCH_CHUNK // max(1, int(np.prod(values.shape[1:]))))
    for top in range(0, values.shape[0], rows):
        out[top : top + rows] = np.round((values[top : top + rows].astype(np.float64) - low) * scale)
    return out


def write_dicom(
    path: str | Path,
    image: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    jpeg: bool = False,
    window: tuple[float, float] | None = None,
    sop_instance_uid: str | None = None,
) -> None:
    """Write a single-frame grayscale radiograph as a DICOM Part 10 file (tests and benchmarks).

    ``jpeg`` stores an 8-bit image JPEG Baseline compressed (through Pillow), as Kaggle's SIIM
    files are; otherwise the pixels are stored uncompressed. ``window`` = (center, width).
    """
    import io

    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

    image = np.asarray(image)
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.Modality = "CR"
    dataset.set_pixel_data(image, photometric, bits_stored or image.dtype.itemsize * 8, generate_instance_uid=True)
    if sop_instance_uid:
        dataset.SOPInstanceUID = sop_instance_uid
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = float(window[0]), float(window[1])
    if jpeg:
        if image.dtype != np.uint8:
            raise ValueError("JPEG Baseline stores 8-bit images only")
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        dataset.PixelData = encapsulate([buffer.getvalue()])
        dataset["PixelData"].VR = "OB"
        dataset.PhotometricInterpretation = photometric
    dataset.save_as(path, enforce_file_format=True)
