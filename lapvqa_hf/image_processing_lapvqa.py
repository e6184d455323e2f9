"""Chest X-ray image processing for the LAPVQA encoders: files (8/16-bit PNG, JPEG, DICOM), PIL images, arrays."""

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

ImageSource = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor

RESIZE_MODES = ("pad", "stretch")
HIGH_BIT_DEPTH_SCALINGS = ("minmax", "full_range")
DICOM_SUFFIXES = (".dcm", ".dicom")


class LapvqaImageProcessor(BaseImageProcessor):
    r"""
    Turns chest X-rays into the encoder's `pixel_values` `[batch, num_channels, image_size, image_size]`.

    Every input first becomes a float image in [0, 1]:
    - 8-bit data is divided by 255; 16-bit PNGs and integer arrays wider than 8 bits are scaled by
      `high_bit_depth_scaling`: `"minmax"` (the image's own min..max, default: X-ray PNGs rarely use all 16 bits)
      or `"full_range"` (divided by 65535);
    - DICOM files (optional extra `lapvqa-hf[dicom]`, pydicom): the modality LUT (rescale slope/intercept),
      then the VOI LUT or the first window (centre/width) are applied, the result is scaled min..max, and
      MONOCHROME1 images are inverted so that bone is bright;
    - float arrays must already lie in [0, 1].
    An image of one constant value has no range to scale: integer data is then scaled by its bit depth (as with
    `"full_range"`), a DICOM becomes mid-grey (0.5). PNG/JPEG files and PIL images are turned upright as their EXIF
    Orientation tag says. Files of several frames (multi-page TIFF, animated GIF/PNG, multi-frame DICOM) are refused;
    an MPO JPEG is read as its primary image and a PIL image at its current frame. Files of more pixels than
    `PIL.Image.MAX_IMAGE_PIXELS` (decompression bombs) are refused. What cannot be read this way is a one-line
    `ValueError` naming the file; the result is always finite.
    Grayscale is replicated to `num_channels` (colour is reduced to luminance for a 1-channel encoder). Then the
    image is resized to `image_size` with `resize_mode`: `"pad"` (default) keeps the aspect ratio and pads the
    short side with black, centred; `"stretch"` resizes both sides. Last, each channel is normalized with
    `image_mean` / `image_std`.

    The upstream cards do not say how images were prepared: the resize mode, bicubic resampling and the ImageNet
    mean/std are pinned assumptions, recorded in `preprocessor_config.json` and all configurable.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 224,
        num_channels: int = 3,
        resize_mode: str = "pad",
        resample: int = Image.Resampling.BICUBIC,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        high_bit_depth_scaling: str = "minmax",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}.")
        if high_bit_depth_scaling not in HIGH_BIT_DEPTH_SCALINGS:
            raise ValueError(
                f"high_bit_depth_scaling must be one of {HIGH_BIT_DEPTH_SCALINGS}, got {high_bit_depth_scaling!r}."
            )
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}.")
        self.image_size = image_size
        self.num_channels = num_channels
        self.resize_mode = resize_mode
        self.resample = int(resample)
        self.image_mean = list(image_mean if image_mean is not None else IMAGENET_DEFAULT_MEAN)[:num_channels]
        self.image_std = list(image_std if image_std is not None else IMAGENET_DEFAULT_STD)[:num_channels]
        self.high_bit_depth_scaling = high_bit_depth_scaling

    @classmethod
    def for_encoder(cls, vision_config, **kwargs) -> "LapvqaImageProcessor":
        """The processor sized for a `LapvqaVisionConfig` (its image size and channels)."""
        return cls(image_size=vision_config.image_size, num_channels=vision_config.num_channels, **kwargs)

    # --- reading --------------------------------------------------------------------------------------------

    def load_image(self, image: ImageSource) -> np.ndarray:
        """Any supported input as float32 `[H, W]` (grayscale) or `[H, W, 3]` (colour) in [0, 1]."""
        if isinstance(image, (str, os.PathLike)):
            return self._read_file(Path(image))
        if isinstance(image, Image.Image):
            try:
                upright = ImageOps.exif_transpose(image)  # decodes an image opened lazily by `Image.open`
            except Exception as error:  # Pillow's decoders raise many types for broken files
                raise ValueError(f"PIL image: cannot decode it: {_first_line(error)}") from None
            return self._from_pil(upright, source="PIL image")
        if isinstance(image, torch.Tensor):
            image = _tensor_to_numpy(image)
        if isinstance(image, np.ndarray):
            return self._from_array(image, source="array")
        raise ValueError(
            f"Unsupported image type {type(image).__name__}: pass a file path, a PIL image, a numpy array or a tensor."
        )

    def load_rgb(self, image: ImageSource) -> Image.Image:
        """Any supported input as the 8-bit RGB image a general-purpose encoder's own processor expects: read as
        `load_image` reads it (16-bit scaling, DICOM LUTs and windows, MONOCHROME1), grayscale replicated."""
        loaded = self.load_image(image)
        rgb = np.repeat(loaded[..., None], 3, axis=-1) if loaded.ndim == 2 else loaded
        return Image.fromarray(np.round(rgb * 255.0).astype(np.uint8), mode="RGB")

    def encoder_pixel_values(self, images: ImageSource | list[ImageSource], encoder_image_processor) -> torch.Tensor:
        """X-rays as a frozen encoder's own image processor (CLIP's, SigLIP's, ...) prepares them: read here (see
        `load_rgb`), then `encoder_image_processor(images=..., return_tensors="pt")["pixel_values"]`."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("No images given: pass one image or a non-empty list of images.")
        rgb = [self.load_rgb(image) for image in images]
        return encoder_image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    def _read_file(self, path: Path) -> np.ndarray:
        if not path.is_file():
            raise ValueError(f"{path}: no such image file.")
        try:
            is_dicom = path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(path)
        except OSError as error:
            raise ValueError(f"{path}: cannot read the file: {error.strerror or error}.") from None
        if is_dicom:
            return read_dicom(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refused, not warned
                with Image.open(path) as opened:
                    # An MPO (phone JPEG) holds its primary image first, then previews of it.
                    frames = 1 if opened.format == "MPO" else getattr(opened, "n_frames", 1)
                    if frames == 1:
                        opened.load()
                        upright = ImageOps.exif_transpose(opened)
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
        return self._from_pil(upright, source=str(path))

    def _from_pil(self, image: Image.Image, source: str) -> np.ndarray:
        if image.mode in ("1", "L", "P", "LA", "PA", "RGBA", "CMYK", "YCbCr", "RGB"):
            converted = image.convert("RGB" if image.mode in ("P", "PA", "RGBA", "CMYK", "YCbCr", "RGB") else "L")
            return self._from_array(np.asarray(converted), source)
        if image.mode.startswith("I;16") or image.mode in ("I", "F"):
            return self._from_array(np.asarray(image), source, bits=16 if image.mode.startswith("I;16") else None)
        raise ValueError(f"{source}: unsupported image mode {image.mode!r} (expected grayscale or RGB).")

    def _from_array(self, array: np.ndarray, source: str, bits: int | None = None) -> np.ndarray:
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
        if array.dtype == np.uint8:
            return array.astype(np.float32) / 255.0
        if np.issubdtype(array.dtype, np.integer):
            return self._scale_high_bit_depth(array.astype(np.float64), bits).astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"{source}: the image holds NaN or infinite values; float images must lie in [0, 1].")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(
                f"{source}: float images must lie in [0, 1], found values in [{array.min():.3g}, {array.max():.3g}]; "
                "pass integers (8/16-bit) or scale the image first."
            )
        return array.astype(np.float32)

    def _scale_high_bit_depth(self, array: np.ndarray, bits: int | None) -> np.ndarray:
        maximum = float(2 ** (bits or 16) - 1)
        if self.high_bit_depth_scaling == "full_range":
            return np.clip(array / maximum, 0.0, 1.0)
        # An image of one value has no range of its own: it is scaled by its bit depth, as with "full_range".
        return min_max_scale(array, constant=float(np.clip(array.flat[0] / maximum, 0.0, 1.0)))

    # --- geometry and normalization ---------------------------------------------------------------------------

    def to_channels(self, image: np.ndarray) -> np.ndarray:
        """`[H, W]` or `[H, W, 3]` -> `[num_channels, H, W]`."""
        if image.ndim == 3 and self.num_channels == 1:
            image = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if image.ndim == 2:
            return np.repeat(image[None], self.num_channels, axis=0)
        return np.moveaxis(image, -1, 0)

    def resize(self, image: np.ndarray) -> np.ndarray:
        """`[C, H, W]` in [0, 1] -> `[C, image_size, image_size]` by `resize_mode`."""
        _, height, width = image.shape
        size = self.image_size
        if self.resize_mode == "stretch":
            new_height, new_width = size, size
        else:
            scale = size / max(height, width)
            new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
        channels = [
            np.asarray(Image.fromarray(channel, mode="F").resize((new_width, new_height), resample=self.resample))
            for channel in image.astype(np.float32)
        ]
        resized = np.clip(np.stack(channels), 0.0, 1.0)  # bicubic overshoots a little
        if (new_height, new_width) == (size, size):
            return resized
        canvas = np.zeros((image.shape[0], size, size), dtype=np.float32)
        top, left = (size - new_height) // 2, (size - new_width) // 2
        canvas[:, top : top + new_height, left : left + new_width] = resized
        return canvas

    def normalize(self, image: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
        return (image - mean) / std

    def preprocess(
        self, images: ImageSource | list[ImageSource], return_tensors: str | None = "pt", **kwargs
    ) -> BatchFeature:
        """One image or a list of them -> `BatchFeature(pixel_values=[B, C, image_size, image_size])`."""
        if kwargs:
            raise ValueError(f"Unexpected arguments {sorted(kwargs)}; set options on the image processor instead.")
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("No images given: pass one image or a non-empty list of images.")
        else:
            images = [images]
        pixel_values = [self.normalize(self.resize(self.to_channels(self.load_image(image)))) for image in images]
        return BatchFeature(data={"pixel_values": np.stack(pixel_values)}, tensor_type=return_tensors)

    # --- detection outputs ------------------------------------------------------------------------------------

    def post_process_object_detection(
        self,
        outputs,
        threshold: float = 0.5,
        target_sizes: torch.Tensor | list[tuple[int, int]] | None = None,
        top_k: int | None = None,
        id2label: dict[int, str] | None = None,
    ) -> list[dict[str, torch.Tensor | list[str]]]:
        """Turns a detection model's `logits` / `pred_boxes` into per-image detections, like `DetrImageProcessor`.

        Each query's score is its most likely class after a softmax over all classes, the last (no-object) one
        excluded; queries scoring above `threshold` are kept, best first, at most `top_k` of them.

        Args:
            outputs: a [`LapvqaDetectionOutput`] (or anything with `logits` `[B, Q, C + 1]` and `pred_boxes`
                `[B, Q, 4]` as (cx, cy, w, h) in [0, 1] of the encoder's square input image).
            threshold (`float`): minimum score of a kept detection.
            target_sizes (`torch.Tensor` of shape `[B, 2]` or a list of `(height, width)`, *optional*): the size of
                each original image. Boxes are then in its pixels: the `resize_mode` this processor applied is
                undone (with `"pad"`, the padding around the image is removed) and boxes are clipped to the image.
                Without it, boxes stay normalised to the encoder's input image.
            top_k (`int`, *optional*): keep at most this many detections per image.
            id2label (`dict[int, str]`, *optional*): class names (`model.config.id2label`); adds `label_names`.

        Returns:
            One dict per image: `scores` `[K]`, `labels` `[K]` and `boxes` `[K, 4]` as (x0, y0, x1, y1), plus
            `label_names` (list of `K` str) when `id2label` is given.
        """
        logits, pred_boxes = outputs.logits, outputs.pred_boxes
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(
                f"target_sizes holds {len(target_sizes)} sizes but the outputs hold {len(logits)} images; pass one "
                "(height, width) per image."
            )
        scores, labels = logits.float().softmax(dim=-1)[..., :-1].max(dim=-1)
        cx, cy, w, h = pred_boxes.float().unbind(-1)
        boxes = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)

        results = []
        for index in range(len(logits)):
            keep = torch.nonzero(scores[index] > threshold).squeeze(1)
            keep = keep[scores[index][keep].argsort(descending=True)][:top_k]
            image_boxes = boxes[index][keep]
            if target_sizes is not None:
                height, width = (int(size) for size in target_sizes[index])
                image_boxes = self.boxes_to_original(image_boxes, height, width)
            result = {"scores": scores[index][keep], "labels": labels[index][keep], "boxes": image_boxes}
            if id2label is not None:
                result["label_names"] = [id2label[int(label)] for label in result["labels"]]
            results.append(result)
        return results

    def boxes_to_original(self, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(x0, y0, x1, y1) normalised to the resized `image_size` square -> pixels of the `height` x `width`
        original, undoing `resize` exactly (including its rounding and centred padding) and clipped to the image."""
        size = self.image_size
        if self.resize_mode == "stretch":
            new_height, new_width, top, left = size, size, 0, 0
        else:
            scale = size / max(height, width)
            new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
            top, left = (size - new_height) // 2, (size - new_width) // 2
        offset = boxes.new_tensor([left, top, left, top])
        pixels_per_unit = boxes.new_tensor([width / new_width, height / new_height] * 2)
        limits = boxes.new_tensor([width, height, width, height])
        return torch.minimum((boxes * size - offset) * pixels_per_unit, limits).clamp(min=0)


def min_max_scale(array: np.ndarray, constant: float) -> np.ndarray:
    """`array` scaled to [0, 1] by its own min..max; an array of one value has no range and becomes `constant`."""
    low, high = float(array.min()), float(array.max())
    if high == low:
        return np.full(array.shape, constant)
    return (array - low) / (high - low)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()  # numpy has no bfloat16; float32 holds every bfloat16 value
    try:
        return tensor.numpy()
    except (TypeError, RuntimeError) as error:  # sparse, quantized, or a dtype numpy lacks
        raise ValueError(f"tensor: cannot read it as an image ({tensor.dtype}): {_first_line(error)}") from None


def _has_dicom_preamble(path: Path) -> bool:
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


__all__ = ["LapvqaImageProcessor", "read_dicom"]
