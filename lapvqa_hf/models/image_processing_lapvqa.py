"""Chest X-ray image processing for the LAPVQA encoders: files (8/16-bit PNG, JPEG, DICOM), PIL images, arrays."""

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack

from .xray_reading import (
    GREY_MODES,
    HIGH_BIT_DEPTH_SCALINGS,
    ImageSource,
    from_array,
    from_pil,
    is_dicom,
    open_image_file,
    read_dicom,
    tensor_to_numpy,
    to_unit,
    unit_range,
    upright,
)

RESIZE_MODES = ("pad", "stretch")
# Standard options that mean nothing here, refused rather than ignored: intensities are scaled as the image is stored
# (bit depth, DICOM LUTs), grey is replicated to `num_channels`, `resize_mode` places the image on the `size` canvas,
# and channels come first.
UNSUPPORTED_OPTIONS = (
    "do_rescale",
    "rescale_factor",
    "do_center_crop",
    "crop_size",
    "do_pad",
    "pad_size",
    "do_convert_rgb",
    "data_format",
    "input_data_format",
)


class LapvqaImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    resize_mode (`str`, *optional*, defaults to `"pad"`):
        `"pad"` keeps the aspect ratio and pads with black, centred; `"stretch"` resizes both sides to `size`.
    high_bit_depth_scaling (`str`, *optional*, defaults to `"minmax"`):
        How 16-bit PNGs and integer arrays wider than 8 bits reach [0, 1]: `"minmax"` (the image's own range) or
        `"full_range"` (divided by 65535).
    num_channels (`int`, *optional*, defaults to 3):
        The encoder's input channels: grey is replicated to 3, colour reduced to luminance for 1.
    """

    resize_mode: str
    high_bit_depth_scaling: str
    num_channels: int


class LapvqaImageProcessor(PilBackend):
    r"""
    Turns chest X-rays into the encoder's `pixel_values` `[batch, num_channels, size["height"], size["width"]]`.

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
    Colour is reduced to luminance for a 1-channel encoder. With `do_resize`, the image is resized to `size` with
    `resize_mode` and `resample` (then clipped to [0, 1]: bicubic overshoots a little); grey is replicated to
    `num_channels`; with `do_normalize`, each channel is normalized with `image_mean` / `image_std`.

    This is transformers' PIL backend (numpy images, no torchvision needed): PIL resizes, on float images, and a
    grey 8/16-bit file or PIL image is resized before it is scaled to [0, 1] (see `process_image`). The upstream
    cards do not say how images were prepared: the resize mode, bicubic resampling and the ImageNet mean/std are
    pinned assumptions, recorded in `preprocessor_config.json` and all configurable. `image_size` (configs written
    by lapvqa-hf 0.3 and older) is read as a square `size`.
    """

    valid_kwargs = LapvqaImageProcessorKwargs
    model_input_names = ["pixel_values"]
    do_resize = True
    size = {"height": 224, "width": 224}
    resample = PILImageResampling.BICUBIC
    do_normalize = True
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    rescale_factor = None
    resize_mode = "pad"
    high_bit_depth_scaling = "minmax"
    num_channels = 3

    def __init__(self, **kwargs: Unpack[LapvqaImageProcessorKwargs]):
        if "image_size" in kwargs:
            image_size = kwargs.pop("image_size")
            warnings.warn(
                f"LapvqaImageProcessor: image_size={image_size} is deprecated, read as size={{'height': {image_size}, "
                f"'width': {image_size}}}; save the processor again to write size instead.",
                FutureWarning,
                stacklevel=2,
            )
            size = {"height": image_size, "width": image_size}
            if kwargs.get("size") not in (None, size):
                raise ValueError(f"image_size={image_size} and size={kwargs['size']} disagree; pass size alone.")
            kwargs["size"] = size
        super().__init__(**kwargs)
        self._validate_preprocess_kwargs(**{name: getattr(self, name) for name in self._valid_kwargs_names})

    @classmethod
    def for_encoder(cls, vision_config, **kwargs) -> "LapvqaImageProcessor":
        """The processor sized for a `LapvqaVisionConfig` (its image size and channels)."""
        side = vision_config.image_size
        return cls(size={"height": side, "width": side}, num_channels=vision_config.num_channels, **kwargs)

    @property
    def image_size(self) -> int:
        """Deprecated: the side of the square `size`."""
        warnings.warn("LapvqaImageProcessor.image_size is deprecated; read size instead.", FutureWarning, stacklevel=2)
        if self.size.height != self.size.width:
            raise ValueError(f"image_size is the side of a square size, but size is {dict(self.size)}; read size.")
        return self.size.height

    # --- options ----------------------------------------------------------------------------------------------

    def _standardize_kwargs(self, **kwargs) -> dict:
        kwargs = super()._standardize_kwargs(**kwargs)
        channels = kwargs.get("num_channels")
        for key in ("image_mean", "image_std"):  # ImageNet's three values serve a 1-channel encoder as their first
            if channels is not None and isinstance(kwargs[key], tuple):
                kwargs[key] = kwargs[key][:channels]
        return kwargs

    def _validate_preprocess_kwargs(
        self,
        size: SizeDict | None = None,
        resize_mode: str | None = None,
        high_bit_depth_scaling: str | None = None,
        num_channels: int | None = None,
        **kwargs,
    ) -> None:
        for option in UNSUPPORTED_OPTIONS:
            if kwargs.get(option) is not None:
                raise ValueError(
                    f"LapvqaImageProcessor takes no {option}: it scales intensities as the image is stored "
                    "(high_bit_depth_scaling), places it with resize_mode and gives num_channels channels first."
                )
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}.")
        if high_bit_depth_scaling not in HIGH_BIT_DEPTH_SCALINGS:
            raise ValueError(
                f"high_bit_depth_scaling must be one of {HIGH_BIT_DEPTH_SCALINGS}, got {high_bit_depth_scaling!r}."
            )
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}.")
        if size is None or not (size.height and size.width) or set(dict(size)) != {"height", "width"}:
            raise ValueError(f"size must be {{'height': int, 'width': int}}, got {dict(size or {})}.")
        super()._validate_preprocess_kwargs(size=size, **kwargs)

    # --- reading --------------------------------------------------------------------------------------------

    def load_image(self, image: ImageSource, high_bit_depth_scaling: str | None = None) -> np.ndarray:
        """Any supported input as float32 `[H, W]` (grayscale) or `[H, W, 3]` (colour) in [0, 1]."""
        scaling = high_bit_depth_scaling or self.high_bit_depth_scaling
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if is_dicom(path):
                return read_dicom(path)
            with open_image_file(path) as opened:
                return from_pil(opened, str(path), scaling)
        if isinstance(image, Image.Image):
            return from_pil(upright(image), "PIL image", scaling)
        if isinstance(image, torch.Tensor):
            image = tensor_to_numpy(image)
        if isinstance(image, np.ndarray):
            return from_array(image, "array", scaling)
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
        rgb = [self.load_rgb(image) for image in _image_list(images)]
        return encoder_image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    # --- the backend's steps ----------------------------------------------------------------------------------

    def preprocess(
        self, images: ImageSource | list[ImageSource], **kwargs: Unpack[LapvqaImageProcessorKwargs]
    ) -> BatchFeature:
        """One image or a list of them -> `BatchFeature(pixel_values=[B, C, height, width])`; any option of the
        processor can be overridden for this call. `return_tensors` defaults to `"pt"` (`None`: a list of arrays)."""
        unexpected = sorted(set(kwargs) - set(self._valid_kwargs_names))
        if unexpected:
            options = sorted(set(self._valid_kwargs_names) - set(UNSUPPORTED_OPTIONS))
            raise ValueError(f"Unexpected arguments {unexpected}; expected options among {options}.")
        kwargs.setdefault("return_tensors", "pt")
        return super().preprocess(images, **kwargs)

    def _prepare_image_like_inputs(self, images: ImageSource | list[ImageSource], **kwargs) -> list[np.ndarray]:
        return [self.process_image(image, **kwargs) for image in _image_list(images)]  # a flat list: one per image

    def process_image(
        self,
        image: ImageSource,
        do_resize: bool | None = None,
        size: SizeDict | None = None,
        resample: PILImageResampling | int | None = None,
        resize_mode: str | None = None,
        high_bit_depth_scaling: str | None = None,
        num_channels: int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """One input -> float32 `[1, H, W]` (grey) or `[3, H, W]` in [0, 1], with `do_resize` on the `size` canvas;
        colour becomes luminance for a 1-channel encoder, grey is replicated to `num_channels` later, once small.
        Reading and resizing go together: a grey 8/16-bit file or PIL image is resized as PIL decoded it, before it
        is scaled to [0, 1] and made an array, which on a large X-ray skips most of the work for the same values."""
        scaling = high_bit_depth_scaling or self.high_bit_depth_scaling
        steps = dict(
            do_resize=self.do_resize if do_resize is None else do_resize,
            size=size or self.size,
            resample=self.resample if resample is None else resample,
            resize_mode=resize_mode or self.resize_mode,
            num_channels=num_channels or self.num_channels,
        )
        if isinstance(image, (str, os.PathLike)) and not is_dicom(Path(image)):
            with open_image_file(Path(image)) as opened:
                return self._process_pil(opened, str(image), scaling, **steps)
        if isinstance(image, Image.Image):
            return self._process_pil(upright(image), "PIL image", scaling, **steps)
        return self._process_array(self.load_image(image, scaling), **steps)  # DICOM, arrays, tensors

    def _process_pil(self, image: Image.Image, source: str, scaling: str, **steps) -> np.ndarray:
        if steps["do_resize"] and image.mode in GREY_MODES:
            return _resize_grey(image, scaling, steps["size"], steps["resample"], steps["resize_mode"])
        return self._process_array(from_pil(image, source, scaling), **steps)

    def _process_array(
        self,
        image: np.ndarray,
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | int,
        resize_mode: str,
        num_channels: int,
    ) -> np.ndarray:
        if image.ndim == 3 and num_channels == 1:
            image = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        image = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
        return self.resize(image, size, resample, resize_mode) if do_resize else image

    def resize(
        self,
        image: np.ndarray,
        size: SizeDict,
        resample: PILImageResampling | int | None = None,
        resize_mode: str | None = None,
        **kwargs,
    ) -> np.ndarray:
        """`[C, H, W]` in [0, 1] -> `[C, size.height, size.width]` by `resize_mode`, each channel resized by PIL."""
        channels = [Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32)) for channel in image]
        resample = self.resample if resample is None else resample
        return _resize_to_canvas(channels, size, resample, resize_mode or self.resize_mode)

    def _preprocess(
        self,
        images: list[np.ndarray],
        num_channels: int,
        do_normalize: bool,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
        return_tensors: str | None,
        **kwargs,
    ) -> BatchFeature:
        pixel_values = []
        for image in images:
            image = np.repeat(image, num_channels // len(image), axis=0)  # grey -> num_channels
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            pixel_values.append(image)
        if return_tensors is not None and len({image.shape for image in pixel_values}) > 1:
            raise ValueError(
                f"Images of sizes {sorted({image.shape[1:] for image in pixel_values})} cannot be stacked into one "
                "tensor; pass do_resize=True or return_tensors=None."
            )
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

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
        """(x0, y0, x1, y1) normalised to the resized `size` canvas -> pixels of the `height` x `width` original,
        undoing `resize` exactly (including its rounding and centred padding) and clipped to the image."""
        new_height, new_width, top, left = placement(height, width, self.size, self.resize_mode)
        canvas = boxes.new_tensor([self.size.width, self.size.height] * 2)
        offset = boxes.new_tensor([left, top, left, top])
        pixels_per_unit = boxes.new_tensor([width / new_width, height / new_height] * 2)
        limits = boxes.new_tensor([width, height, width, height])
        return torch.minimum((boxes * canvas - offset) * pixels_per_unit, limits).clamp(min=0)


def placement(height: int, width: int, size: SizeDict, resize_mode: str) -> tuple[int, int, int, int]:
    """Where `resize` puts a `height` x `width` image on the `size` canvas: (new_height, new_width, top, left)."""
    if resize_mode == "stretch":
        return size.height, size.width, 0, 0
    scale = min(size.height / height, size.width / width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    return new_height, new_width, (size.height - new_height) // 2, (size.width - new_width) // 2


def _resize_to_canvas(
    channels: list[Image.Image],
    size: SizeDict,
    resample: int,
    resize_mode: str,
    offset: float = 0.0,
    divisor: float = 1.0,
) -> np.ndarray:
    """An image's channels (mode "F") -> float32 `[C, size.height, size.width]`: resized by PIL where `resize_mode`
    places them, taken to [0, 1] as `(value - offset) / divisor`, clipped (bicubic overshoots a little), padded black."""
    width, height = channels[0].size
    new_height, new_width, top, left = placement(height, width, size, resize_mode)
    resample = PILImageResampling(resample)
    resized = np.stack([np.asarray(channel.resize((new_width, new_height), resample)) for channel in channels])
    canvas = np.zeros((len(channels), size.height, size.width), dtype=np.float32)
    canvas[:, top : top + new_height, left : left + new_width] = to_unit(resized, offset, divisor)
    return canvas


def _resize_grey(image: Image.Image, scaling: str, size: SizeDict, resample: int, resize_mode: str) -> np.ndarray:
    """A grey 8/16-bit PIL image -> `[1, size.height, size.width]`: its stored values resized, then scaled to [0, 1]
    as `load_image` scales them (the same values within float rounding, without the full-size float image)."""
    low, high = image.getextrema()
    offset, divisor = unit_range(low, high, GREY_MODES[image.mode], scaling)
    return _resize_to_canvas([image.convert("F")], size, resample, resize_mode, offset, divisor)


def _image_list(images: ImageSource | list[ImageSource]) -> list[ImageSource]:
    if not isinstance(images, (list, tuple)):
        return [images]
    if not images:
        raise ValueError("No images given: pass one image or a non-empty list of images.")
    return list(images)


__all__ = ["LapvqaImageProcessor", "read_dicom"]
