"""Reading chest X-rays as the LAPVQA models take them: PNG / JPEG (8 or 16 bit, EXIF orientation), DICOM (modality
and VOI LUTs, windows, MONOCHROME1), PIL images, arrays and tensors, each as float `[H, W]` (grey) or `[H, W, 3]` in
[0, 1]. Every problem (a missing, truncated or multi-frame file, a decompression bomb, non-finite attributes) is a
one-line `ValueError` naming the file. Shipped with the image processor (remote code).
"""

import os
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

ImageSource = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor

HIGH_BIT_DEPTH_SCALINGS = ("minmax", "full_range")
DICOM_SUFFIXES = (".dcm", ".dicom")
# Grey PIL modes resized as decoded, before they are scaled to [0, 1] and turned into arrays, with their bit depth.
GREY_MODES = {"L": 8, "I;16": 16}


def is_dicom(path: Path) -> bool:
    if not path.is_file():
        raise ValueError(f"{path}: no such image file.")
    try:
        return path.suffix.lower() in DICOM_SUFFIXES or has_dicom_preamble(path)
    except OSError as error:
        raise ValueError(f"{path}: cannot read the file: {error.strerror or error}.") from None


@contextmanager
def open_image_file(path: Path) -> Iterator[Image.Image]:
    """A PNG/JPEG/... file as its upright, decoded, single-frame PIL image while the file is open; what Pillow cannot
    read, a decompression bomb or a file of several frames is refused with a one-line ValueError naming the file."""
    with ExitStack() as files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refused, not warned
                opened = files.enter_context(Image.open(path))
                # An MPO (phone JPEG) holds its primary image first, then previews of it.
                frames = 1 if opened.format == "MPO" else getattr(opened, "n_frames", 1)
                if frames == 1:
                    opened.load()
                    ImageOps.exif_transpose(opened, in_place=True)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(
                f"{path}: the image has more pixels than the limit of {Image.MAX_IMAGE_PIXELS} "
                "(PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs); raise that limit to read it."
            ) from None
        except Exception as error:  # Pillow's decoders raise many types for broken files
            raise ValueError(
                f"{path}: cannot read it as an image (PNG, JPEG or DICOM expected): {_first_line(error)}"
            ) from None
        if frames != 1:
            raise ValueError(
                f"{path}: holds {frames} frames (a multi-page or animated image); expected a single image: save the "
                "frame to use as a file of its own."
            )
        yield opened


def upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)  # decodes an image opened lazily by `Image.open`
    except Exception as error:  # Pillow's decoders raise many types for broken files
        raise ValueError(f"PIL image: cannot decode it: {_first_line(error)}") from None


def from_pil(image: Image.Image, source: str, scaling: str) -> np.ndarray:
    if image.mode in ("P", "PA", "RGBA", "CMYK", "YCbCr", "RGB"):
        return from_array(np.asarray(image.convert("RGB")), source, scaling)
    if image.mode in ("1", "L", "LA"):
        return from_array(np.asarray(image.convert("L")), source, scaling)
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return from_array(np.asarray(image), source, scaling, bits=16 if image.mode.startswith("I;16") else None)
    raise ValueError(f"{source}: unsupported image mode {image.mode!r} (expected grayscale or RGB).")


def from_array(array: np.ndarray, source: str, scaling: str, bits: int | None = None) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{source}: unsupported pixel type {array.dtype}; expected bool, integer or float pixels.")
    if array.size == 0:
        raise ValueError(f"{source}: the image is empty (shape {list(array.shape)}).")
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels-first input
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]  # drop alpha
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(
            f"{source}: expected a grayscale [H, W] or colour [H, W, 3] image, got shape {list(array.shape)}."
        )
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        bits = 8 if array.dtype == np.uint8 else bits or 16
        offset, divisor = unit_range(float(array.min()), float(array.max()), bits, scaling)
        # float32 holds every 16-bit value exactly; wider integers are scaled in float64.
        return to_unit(array, offset, divisor, np.float32 if array.itemsize <= 2 else np.float64).astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{source}: the image holds NaN or infinite values; float images must lie in [0, 1].")
    if array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(
            f"{source}: float images must lie in [0, 1], found values in [{array.min():.3g}, {array.max():.3g}]; "
            "pass integers (8/16-bit) or scale the image first."
        )
    return array.astype(np.float32)


def unit_range(low: float, high: float, bits: int, scaling: str) -> tuple[float, float]:
    """(offset, divisor) taking integer pixels in `low..high` to [0, 1] as `(value - offset) / divisor`: 8-bit data by
    255; wider data by `scaling`, its own range ("minmax") or 65535 ("full_range"). An image of one value has no
    range of its own: it is scaled by its bit depth, as with "full_range"."""
    if bits == 8 or scaling == "full_range" or high == low:
        return 0.0, float(2**bits - 1)
    return low, high - low


def to_unit(values: np.ndarray, offset: float, divisor: float, dtype: type[np.floating] = np.float32) -> np.ndarray:
    unit = np.subtract(values, offset, dtype=dtype)
    unit /= divisor
    return np.clip(unit, 0.0, 1.0, out=unit)


def min_max_scale(array: np.ndarray, constant: float) -> np.ndarray:
    """`array` scaled to [0, 1] by its own min..max; an array of one value has no range and becomes `constant`."""
    low, high = float(array.min()), float(array.max())
    if high == low:
        return np.full(array.shape, constant)
    return (array - low) / (high - low)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()  # numpy has no bfloat16; float32 holds every bfloat16 value
    try:
        return tensor.numpy()
    except (TypeError, RuntimeError) as error:  # sparse, quantized, or a dtype numpy lacks
        raise ValueError(f"tensor: cannot read it as an image ({tensor.dtype}): {_first_line(error)}") from None


def has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as file:
        header = file.read(132)
    return len(header) == 132 and header[128:] == b"DICM"


def _dicom_number(dataset, keyword: str, path: str | os.PathLike) -> float | None:
    """The first value of a numeric DICOM attribute, or None when absent; what is no finite number is refused."""
    from pydicom.multival import MultiValue

    value = dataset.get(keyword)
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not np.isfinite(number):
        raise ValueError(f"{path}: {keyword} is {str(value)!r}; expected a finite number.")
    return number


def _require_finite(values: np.ndarray, path: str | os.PathLike, stage: str) -> None:
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: the pixel values are NaN or infinite {stage}; the file is not a valid X-ray.")


def read_dicom(path: str | os.PathLike) -> np.ndarray:
    """A single-frame grayscale DICOM as float32 `[H, W]` in [0, 1], as a radiologist's viewer would show it.

    Refused with a one-line `ValueError` naming the file and the attribute: several frames (`NumberOfFrames`), more
    pixels than `PIL.Image.MAX_IMAGE_PIXELS`, a `RescaleSlope` / `RescaleIntercept` / `WindowCenter` that is no
    finite number, a zero slope, a `WindowWidth` that is no finite positive number, and pixels that are not finite
    before or after the LUTs. An image of one value after the LUTs becomes mid-grey (0.5)."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise ImportError("Reading DICOM needs pydicom: pip install 'lapvqa-hf[dicom]'.") from None
    try:
        dataset = pydicom.dcmread(path)
        photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
        frames = int(dataset.get("NumberOfFrames") or 1)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except Exception as error:  # pydicom raises many types for broken files
        raise ValueError(f"{path}: cannot read it as a DICOM image: {_first_line(error)}") from None
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"{path}: expected a grayscale X-ray (MONOCHROME1/2), got {photometric}.")
    if frames != 1:
        raise ValueError(f"{path}: holds {frames} frames (NumberOfFrames); expected a single-frame image.")
    if Image.MAX_IMAGE_PIXELS is not None and rows * columns > Image.MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{path}: {rows} x {columns} pixels exceed the limit of {Image.MAX_IMAGE_PIXELS} "
            "(PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs); raise that limit to read it."
        )
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        raise ValueError(f"{path}: cannot read it as a DICOM image: {_first_line(error)}") from None
    if pixels.ndim != 2:
        raise ValueError(f"{path}: expected a single-frame image, got pixel data of shape {list(pixels.shape)}.")
    _require_finite(pixels, path, "in the pixel data")
    if _dicom_number(dataset, "RescaleSlope", path) == 0:
        raise ValueError(f"{path}: RescaleSlope is 0, which maps every pixel to one value; expected a non-zero slope.")
    _dicom_number(dataset, "RescaleIntercept", path)
    if "VOILUTSequence" not in dataset:  # otherwise the VOI LUT applies and the window is not used
        _dicom_number(dataset, "WindowCenter", path)
        width = _dicom_number(dataset, "WindowWidth", path)
        if width is not None and width <= 0:
            raise ValueError(f"{path}: WindowWidth is {width:g}; expected a positive width.")
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, naming the file
            values = apply_modality_lut(pixels, dataset)
    except Exception as error:  # pydicom's, for a modality LUT it cannot apply
        raise ValueError(f"{path}: cannot apply its modality LUT: {_first_line(error)}") from None
    _require_finite(values, path, "after the modality LUT (RescaleSlope, RescaleIntercept)")
    integral = np.issubdtype(values.dtype, np.floating) and np.array_equal(values, np.round(values))
    if integral and np.abs(values).max() < 2**62:
        values = values.astype(np.int64)  # a VOI LUT indexes by integer value
    try:
        values = apply_voi_lut(values, dataset, index=0)
    except Exception as error:  # pydicom's, for a VOI LUT or window it cannot apply
        raise ValueError(f"{path}: cannot apply its VOI LUT or window: {_first_line(error)}") from None
    values = np.asarray(values, dtype=np.float64)
    _require_finite(values, path, "after the VOI LUT or window")
    image = min_max_scale(values, constant=0.5).astype(np.float32)
    return 1.0 - image if photometric == "MONOCHROME1" else image


__all__ = [
    "DICOM_SUFFIXES",
    "GREY_MODES",
    "HIGH_BIT_DEPTH_SCALINGS",
    "ImageSource",
    "from_array",
    "has_dicom_preamble",
    "from_pil",
    "is_dicom",
    "min_max_scale",
    "open_image_file",
    "read_dicom",
    "tensor_to_numpy",
    "to_unit",
    "unit_range",
    "upright",
]
