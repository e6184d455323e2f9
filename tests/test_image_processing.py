"""LapvqaImageProcessor on the formats chest X-rays come in, on transformers' image-processor backends, and
LapvqaProcessor's prompt layouts."""

import json

import numpy as np
import pytest
import torch
from conftest import run_without_lapvqa_hf
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.models.auto import image_processing_auto

from lapvqa_hf import LapvqaImageProcessor, LapvqaProcessor

GRADIENT_16BIT = (np.arange(40 * 30).reshape(40, 30) * 3 + 1000).astype(np.uint16)  # uses ~12 bits
# preprocessor_config.json as lapvqa-hf 0.3 and older wrote it (the converted repos on the Hub hold such files).
OLD_PREPROCESSOR_CONFIG = {
    "auto_map": {"AutoImageProcessor": "image_processing_lapvqa.LapvqaImageProcessor"},
    "high_bit_depth_scaling": "minmax",
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "LapvqaImageProcessor",
    "image_size": 28,
    "image_std": [0.229, 0.224, 0.225],
    "num_channels": 3,
    "resample": 3,
    "resize_mode": "stretch",
}


@pytest.fixture
def processor():
    # No normalization, so the tests read intensities in [0, 1] directly.
    return LapvqaImageProcessor(size=28, do_normalize=False)


def write_dicom(path, stored, photometric, *, slope=1.0, intercept=0.0, voi_lut=None, window=None):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if voi_lut is not None:
        first, data = voi_lut
        item = Dataset()
        item.add_new(0x00283002, "US", [len(data), first, 16])  # LUTDescriptor
        item.add_new(0x00283006, "US", data)  # LUTData
        ds.VOILUTSequence = [item]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_8bit_png_and_jpeg(processor, tmp_path):
    gray = (np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "x.png")
    Image.fromarray(gray).save(tmp_path / "x.jpg", quality=100)
    png = processor.load_image(tmp_path / "x.png")
    assert png.dtype == np.float32 and np.allclose(png, gray / 255.0)
    jpg = processor.load_image(str(tmp_path / "x.jpg"))
    assert jpg.shape == (28, 28) and np.abs(jpg - gray / 255.0).max() < 0.05
    pixels = processor([tmp_path / "x.png", tmp_path / "x.jpg"])["pixel_values"]
    assert pixels.shape == (2, 3, 28, 28) and pixels.dtype == torch.float32
    assert torch.equal(pixels[0, 0], pixels[0, 1]), "grayscale is replicated to the encoder's channels"


def test_16bit_png_is_scaled_by_its_own_range(processor, tmp_path):
    Image.fromarray(GRADIENT_16BIT).save(tmp_path / "x16.png")
    assert Image.open(tmp_path / "x16.png").mode.startswith("I;16")
    image = processor.load_image(tmp_path / "x16.png")
    expected = (GRADIENT_16BIT - GRADIENT_16BIT.min()) / (GRADIENT_16BIT.max() - GRADIENT_16BIT.min())
    assert np.allclose(image, expected, atol=1e-6)
    full = LapvqaImageProcessor(high_bit_depth_scaling="full_range").load_image(tmp_path / "x16.png")
    assert np.allclose(full, GRADIENT_16BIT / 65535.0, atol=1e-6)


def test_numpy_pil_and_tensor_inputs_agree(processor):
    gray = (np.arange(20 * 24).reshape(20, 24) % 256).astype(np.uint8)
    from_numpy = processor(gray)["pixel_values"]
    from_pil = processor(Image.fromarray(gray))["pixel_values"]
    from_tensor = processor(torch.from_numpy(gray))["pixel_values"]
    assert torch.equal(from_numpy, from_tensor)
    # A grey PIL image is resized before it is scaled to [0, 1], an array after: the same values up to float rounding.
    assert torch.allclose(from_numpy, from_pil, atol=1e-6)
    rgb = np.stack([gray] * 3, axis=-1)
    assert torch.allclose(processor(rgb)["pixel_values"], from_numpy, atol=1e-6)


def test_pad_keeps_the_aspect_ratio_and_stretch_does_not(processor):
    wide = np.ones((20, 40), dtype=np.float32)
    padded = processor(wide)["pixel_values"][0, 0]
    assert (
        torch.allclose(padded[7:21], torch.ones(14, 28)) and torch.all(padded[:7] == 0) and torch.all(padded[21:] == 0)
    )
    assert torch.allclose(processor(wide, resize_mode="stretch")["pixel_values"], torch.ones(1, 3, 28, 28))


def test_pad_centres_the_image_on_a_canvas_of_any_shape(processor):
    wide = np.ones((20, 40), dtype=np.float32)
    # 40 x 20 into 30 (high) x 80 (wide): the height limits, scale 1.5 -> 60 x 30, at left (80 - 60) // 2 = 10.
    padded = processor(wide, size={"height": 30, "width": 80})["pixel_values"][0, 0]
    assert padded.shape == (30, 80)
    assert torch.allclose(padded[:, 10:70], torch.ones(30, 60)) and torch.all(padded[:, :10] == 0)
    assert torch.all(padded[:, 70:] == 0)


def test_normalization_uses_the_configured_mean_and_std():
    processor = LapvqaImageProcessor(size=14, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    pixels = processor(np.full((14, 14), 255, dtype=np.uint8))["pixel_values"]
    assert torch.allclose(pixels, torch.full_like(pixels, 2.0))


def test_monochrome1_dicom_with_rescale_and_voi_lut(processor, tmp_path):
    stored = np.tile(np.array([0, 1, 2, 3]), (4, 1))
    # modality LUT: 2 * stored + 10; VOI LUT starting at 10, squaring the offset (non-linear on purpose)
    path = write_dicom(
        tmp_path / "m1.dcm", stored, "MONOCHROME1", slope=2, intercept=10, voi_lut=(10, [i * i * 100 for i in range(8)])
    )
    image = processor.load_image(path)
    after_luts = np.array([0, 4, 16, 36]) * 100.0  # LUT[2 * stored]
    expected_row = 1.0 - after_luts / after_luts.max()  # scaled, then inverted: MONOCHROME1 shows bone bright
    assert np.allclose(image, np.tile(expected_row, (4, 1)), atol=1e-6)


def test_monochrome2_dicom_window_is_applied(processor, tmp_path):
    stored = np.tile(np.array([0, 1000, 2000, 3000, 4000]), (5, 1))
    path = write_dicom(tmp_path / "w.dicom", stored, "MONOCHROME2", window=(2000, 2000))
    row = processor.load_image(path)[0]
    assert row[0] == row[1] == 0.0 and row[3] == row[4] == 1.0, "values outside the window are clipped"
    assert 0.4 < row[2] < 0.6
    assert processor(path)["pixel_values"].shape == (1, 3, 28, 28)


def test_dicom_is_recognised_without_its_suffix(processor, tmp_path):
    path = write_dicom(tmp_path / "study_0001", np.eye(4) * 100, "MONOCHROME2")
    assert processor.load_image(path).shape == (4, 4)


def test_unreadable_and_wrong_inputs_are_refused(processor, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png: cannot read it as an image"):
        processor(tmp_path / "notes.png")
    with pytest.raises(ValueError, match="no such image file"):
        processor(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="No images given"):
        processor([])
    with pytest.raises(
        ValueError, match=r"expected a grayscale \[H, W\] or colour \[H, W, 3\] image, got shape \[8, 8, 2\]"
    ):
        processor(np.zeros((8, 8, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\]"):
        processor(np.full((8, 8), 3.0, dtype=np.float32))
    with pytest.raises(ValueError, match="the image is empty"):
        processor(np.zeros((0, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="Unsupported image type list"):
        processor([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        LapvqaImageProcessor(resize_mode="crop")


# --- pixel values as lapvqa-hf 0.3 computed them -----------------------------------------------------------------


def reference_pixel_values(image: np.ndarray, side: int, resize_mode: str, resample: int) -> np.ndarray:
    """lapvqa-hf 0.3's processor on an integer image, kept as the yardstick: scaled to [0, 1] in float64 (8 bits by
    255, wider by its own min..max), replicated to 3 channels, each channel resized by PIL in float ("F") mode,
    clipped to [0, 1], padded centred, normalized with ImageNet's mean and std."""
    values = image / 255.0 if image.dtype == np.uint8 else (image - image.min()) / float(image.max() - image.min())
    channels = np.repeat(values[None], 3, axis=0) if values.ndim == 2 else np.moveaxis(values, -1, 0)
    height, width = values.shape[:2]
    if resize_mode == "stretch":
        new_height, new_width = side, side
    else:
        scale = side / max(height, width)
        new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    resized = [
        Image.fromarray(c.astype(np.float32), mode="F").resize((new_width, new_height), resample) for c in channels
    ]
    canvas = np.zeros((3, side, side), dtype=np.float32)
    top, left = (side - new_height) // 2, (side - new_width) // 2
    canvas[:, top : top + new_height, left : left + new_width] = np.clip(np.stack(resized), 0.0, 1.0)
    mean, std = (np.asarray(v, dtype=np.float32)[:, None, None] for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return (canvas - mean) / std


NOISE = np.random.default_rng(0)


@pytest.mark.parametrize(
    ("image", "side", "resize_mode", "resample"),
    [
        (NOISE.integers(800, 3900, (1500, 1250), dtype=np.uint16), 224, "pad", PILImageResampling.BICUBIC),
        (NOISE.integers(800, 3900, (50, 44), dtype=np.uint16), 224, "pad", PILImageResampling.BICUBIC),
        (NOISE.integers(0, 256, (300, 200), dtype=np.uint8), 224, "stretch", PILImageResampling.BICUBIC),
        (NOISE.integers(0, 256, (61, 47, 3), dtype=np.uint8), 224, "pad", PILImageResampling.BICUBIC),
        (NOISE.integers(0, 65536, (900, 700), dtype=np.uint16), 100, "pad", PILImageResampling.BILINEAR),
        (NOISE.integers(800, 3900, (120, 90), dtype=np.uint16), 64, "stretch", PILImageResampling.LANCZOS),
    ],
    ids=["16-bit-1500x1250", "16-bit-upscaled", "8-bit-stretched", "8-bit-rgb", "16-bit-bilinear", "16-bit-lanczos"],
)
def test_pixel_values_are_within_1e_3_of_lapvqa_hf_0_3(tmp_path, image, side, resize_mode, resample):
    """Faster since: grey resized once and replicated after, a grey file resized before it is scaled to [0, 1],
    intensities scaled in float32: the values move by float rounding (about 1e-6)."""
    Image.fromarray(image).save(tmp_path / "x.png")
    processor = LapvqaImageProcessor(size=side, resize_mode=resize_mode, resample=resample)
    expected = reference_pixel_values(image, side, resize_mode, resample)
    for source in (tmp_path / "x.png", image):  # a grey file is resized before it is scaled, an array after
        assert np.abs(processor(source)["pixel_values"][0].numpy() - expected).max() <= 1e-3


# --- transformers' image-processor design -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xray16(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("xray") / "xray16.png"
    Image.fromarray(np.random.default_rng(1).integers(800, 3900, (90, 70), dtype=np.uint16)).save(path)
    return str(path)


def test_the_options_round_trip_through_preprocessor_config(tmp_path, xray16):
    processor = LapvqaImageProcessor(
        size={"height": 42, "width": 30},
        resize_mode="stretch",
        resample=PILImageResampling.BILINEAR,
        high_bit_depth_scaling="full_range",
        num_channels=1,
        do_normalize=False,
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 42, "width": 30} and "image_size" not in saved
    assert saved["image_mean"] == [0.485], "ImageNet's mean and std cut to the one channel"
    pixels = processor(xray16)["pixel_values"]
    assert pixels.shape == (1, 1, 42, 30)
    for loaded in (LapvqaImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is LapvqaImageProcessor and loaded.to_dict() == processor.to_dict()
        assert torch.equal(loaded(xray16)["pixel_values"], pixels)


def test_a_config_with_image_size_loads_as_a_square_size_and_is_saved_with_size(tmp_path, xray16):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(OLD_PREPROCESSOR_CONFIG))
    with pytest.warns(FutureWarning, match=r"image_size=28 is deprecated, read as size=\{'height': 28, 'width': 28\}"):
        old = AutoImageProcessor.from_pretrained(tmp_path)
    new = LapvqaImageProcessor(size={"height": 28, "width": 28}, resize_mode="stretch")
    assert type(old) is LapvqaImageProcessor and old.size == new.size
    assert torch.equal(old(xray16)["pixel_values"], new(xray16)["pixel_values"])
    old.save_pretrained(tmp_path / "saved-again")
    saved = json.loads((tmp_path / "saved-again" / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 28, "width": 28} and "image_size" not in saved
    with pytest.warns(FutureWarning, match="LapvqaImageProcessor.image_size is deprecated; read size instead"):
        assert old.image_size == 28
    with (
        pytest.warns(FutureWarning),
        pytest.raises(ValueError, match=r"^image_size=28 and size=\{'height': 30, 'width': 30\} disagree"),
    ):
        LapvqaImageProcessor(image_size=28, size={"height": 30, "width": 30})


REMOTE_IMAGE_PROCESSOR = """
import torch
import transformers

processor = transformers.AutoImageProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
pixel_values = processor(sys.argv[2])["pixel_values"]
torch.save({"size": dict(processor.size), "backend": processor.backend, "pixel_values": pixel_values}, sys.argv[3])
"""


def test_without_the_package_an_old_config_loads_as_remote_code_with_the_same_pixels(tmp_path, xray16):
    LapvqaImageProcessor().save_pretrained(tmp_path / "repo")  # this version's code, beside ...
    (tmp_path / "repo" / "preprocessor_config.json").write_text(json.dumps(OLD_PREPROCESSOR_CONFIG))  # ... 0.3's config
    run_without_lapvqa_hf(REMOTE_IMAGE_PROCESSOR, [tmp_path / "repo", xray16, tmp_path / "out.pt"], tmp_path)
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    assert remote["size"] == {"height": 28, "width": 28} and remote["backend"] == "pil"
    expected = LapvqaImageProcessor(size=28, resize_mode="stretch")(xray16)["pixel_values"]
    assert torch.equal(remote["pixel_values"], expected)


def test_auto_image_processor_picks_the_pil_backend_with_or_without_torchvision(tmp_path, monkeypatch):
    LapvqaImageProcessor(size=28).save_pretrained(tmp_path)
    for backend in (None, "pil"):
        loaded = AutoImageProcessor.from_pretrained(tmp_path, backend=backend)
        assert type(loaded) is LapvqaImageProcessor and loaded.backend == "pil"
    # Where torchvision is installed AutoImageProcessor asks for its backend first; this class is the one there is.
    monkeypatch.setattr(image_processing_auto, "is_torchvision_available", lambda: True)
    for backend in (None, "torchvision"):
        assert type(AutoImageProcessor.from_pretrained(tmp_path, backend=backend)) is LapvqaImageProcessor


def test_options_can_be_set_per_call_and_unknown_or_meaningless_ones_are_refused(processor):
    options = dict(size={"height": 20, "width": 16}, resize_mode="stretch", high_bit_depth_scaling="full_range")
    per_call = processor(GRADIENT_16BIT, do_normalize=True, **options)["pixel_values"]
    assert torch.equal(per_call, LapvqaImageProcessor(**options)(GRADIENT_16BIT)["pixel_values"])
    native = processor([GRADIENT_16BIT, GRADIENT_16BIT[:20]], do_resize=False, return_tensors=None)["pixel_values"]
    assert [image.shape for image in native] == [(3, 40, 30), (3, 20, 30)]
    with pytest.raises(
        ValueError,
        match=r"^Images of sizes \[\(20, 30\), \(40, 30\)\] cannot be stacked into one tensor; pass do_resize=True",
    ):
        processor([GRADIENT_16BIT, GRADIENT_16BIT[:20]], do_resize=False)
    with pytest.raises(ValueError, match=r"^Unexpected arguments \['crop'\]; expected options among \["):
        processor(GRADIENT_16BIT, crop=True)
    with pytest.raises(ValueError, match="^LapvqaImageProcessor takes no do_rescale: it scales intensities as"):
        processor(GRADIENT_16BIT, do_rescale=False)
    with pytest.raises(
        ValueError, match=r"^size must be \{'height': int, 'width': int\}, got \{'shortest_edge': 224\}"
    ):
        LapvqaImageProcessor(size={"shortest_edge": 224})


@pytest.fixture(scope="module")
def lapvqa_processor(gpt2_tokenizer):
    return LapvqaProcessor(LapvqaImageProcessor(size=28), gpt2_tokenizer)


def test_captioning_inputs_for_generation_and_training(lapvqa_processor):
    image = np.zeros((30, 30), dtype=np.uint8)
    start = lapvqa_processor(images=[image, image])
    assert start["input_ids"].tolist() == [[50256], [50256]] and start["pixel_values"].shape == (2, 3, 28, 28)
    batch = lapvqa_processor(images=[image, image], text=["No acute process.", "Small left effusion, unchanged."])
    first = lapvqa_processor.tokenizer("No acute process.", add_special_tokens=False)["input_ids"]
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"][0].tolist() == [50256, *first, 50256] + [50256] * (width - len(first) - 2)
    assert batch["attention_mask"][0].sum() == len(first) + 2
    assert batch["labels"][0, len(first) + 2 :].eq(-100).all()


def test_diffvqa_prompt_layout(lapvqa_processor):
    prior, current = np.zeros((30, 30), dtype=np.uint8), np.ones((30, 30), dtype=np.uint8) * 200
    out = lapvqa_processor(
        prior_images=[prior, prior],
        current_images=[current, current],
        text=["what changed?", "is the effusion larger than before?"],
    )
    assert set(out) == {"prior_pixel_values", "current_pixel_values", "input_ids", "attention_mask"}
    question = lapvqa_processor.tokenizer("what changed?", add_special_tokens=False)["input_ids"]
    kept = [t for t, m in zip(out["input_ids"][0].tolist(), out["attention_mask"][0].tolist(), strict=True) if m]
    assert kept == question + [50256]
    assert out["attention_mask"][0, 0] == 0, "prompts are left-padded"


def test_vqa_prompt_layout_is_the_diffvqa_one_with_one_image(gpt2_tokenizer, tmp_path):
    processor = LapvqaProcessor(LapvqaImageProcessor(size=28), gpt2_tokenizer, task="vqa")
    image = np.zeros((30, 30), dtype=np.uint8)
    out = processor(images=[image, image], text=["is there an effusion?", "where is the tube?"])
    assert set(out) == {"pixel_values", "input_ids", "attention_mask"}
    assert out["pixel_values"].shape == (2, 3, 28, 28)
    question = gpt2_tokenizer("where is the tube?", add_special_tokens=False)["input_ids"]
    width = out["input_ids"].shape[1]
    assert out["input_ids"][1].tolist() == [50256] * (width - len(question) - 1) + question + [50256]
    assert out["attention_mask"][1].tolist() == [0] * (width - len(question) - 1) + [1] * (len(question) + 1)
    with pytest.raises(ValueError, match="Got 1 images but 2 questions"):
        processor(images=image, text=["a?", "b?"])
    with pytest.raises(ValueError, match="Questions are needed"):
        processor(images=image)

    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is LapvqaProcessor and reloaded.task == "vqa"
    with pytest.raises(ValueError, match=r"task must be one of \('captioning', 'vqa'\), got 'detection'"):
        LapvqaProcessor(LapvqaImageProcessor(size=28), gpt2_tokenizer, task="detection")


def test_processor_refuses_mismatched_or_missing_inputs(lapvqa_processor):
    image = np.zeros((30, 30), dtype=np.uint8)
    with pytest.raises(ValueError, match="No images given"):
        lapvqa_processor(text="a report")
    with pytest.raises(ValueError, match="needs both prior_images="):
        lapvqa_processor(current_images=image, text="what changed?")
    with pytest.raises(ValueError, match="Got 2 prior images and 1 current images; pass them in pairs"):
        lapvqa_processor(prior_images=[image, image], current_images=image, text="what changed?")
    with pytest.raises(ValueError, match=r"Got 2 \(prior, current\) pairs but 1 questions"):
        lapvqa_processor(prior_images=[image, image], current_images=[image, image], text="what changed?")
    with pytest.raises(ValueError, match="Questions are needed"):
        lapvqa_processor(prior_images=image, current_images=image)
    with pytest.raises(ValueError, match="Got 1 images but 2 reports"):
        lapvqa_processor(images=image, text=["a", "b"])
    with pytest.raises(
        ValueError,
        match=r"report 0 has 300 tokens; with bos and eos it needs 302 of the model's 200 learned positions \(102 too many\)",
    ):
        lapvqa_processor(images=image, text=" a" * 300)
    with pytest.raises(
        ValueError, match=r"question 1: The question has 300 tokens; .* 200 learned positions hold at most 199"
    ):
        lapvqa_processor(prior_images=[image, image], current_images=[image, image], text=["what changed?", " a" * 300])
