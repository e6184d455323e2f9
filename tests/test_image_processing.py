"""LapvqaImageProcessor on the formats chest X-rays come in, and LapvqaProcessor's prompt layouts."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from lapvqa_hf import LapvqaImageProcessor, LapvqaProcessor

GRADIENT_16BIT = (np.arange(40 * 30).reshape(40, 30) * 3 + 1000).astype(np.uint16)  # uses ~12 bits


@pytest.fixture
def processor():
    # No normalization, so the tests read intensities in [0, 1] directly.
    return LapvqaImageProcessor(image_size=28, image_mean=[0, 0, 0], image_std=[1, 1, 1])


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
    assert torch.equal(from_numpy, from_pil) and torch.equal(from_numpy, from_tensor)
    rgb = np.stack([gray] * 3, axis=-1)
    assert torch.allclose(processor(rgb)["pixel_values"], from_numpy, atol=1e-6)


def test_pad_keeps_the_aspect_ratio_and_stretch_does_not():
    wide = np.ones((20, 40), dtype=np.float32)
    padded = LapvqaImageProcessor(image_size=28, image_mean=[0] * 3, image_std=[1] * 3)(wide)["pixel_values"][0, 0]
    assert torch.all(padded[7:21] == 1) and torch.all(padded[:7] == 0) and torch.all(padded[21:] == 0)
    stretched = LapvqaImageProcessor(image_size=28, resize_mode="stretch", image_mean=[0] * 3, image_std=[1] * 3)
    assert torch.all(stretched(wide)["pixel_values"] == 1)


def test_normalization_uses_the_configured_mean_and_std():
    processor = LapvqaImageProcessor(image_size=14, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
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


def test_image_processor_round_trips_through_preprocessor_config(tmp_path):
    from transformers import AutoImageProcessor

    processor = LapvqaImageProcessor(image_size=42, resize_mode="stretch", high_bit_depth_scaling="full_range")
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is LapvqaImageProcessor
    assert (loaded.image_size, loaded.resize_mode, loaded.high_bit_depth_scaling) == (42, "stretch", "full_range")


@pytest.fixture(scope="module")
def lapvqa_processor(gpt2_tokenizer):
    return LapvqaProcessor(LapvqaImageProcessor(image_size=28), gpt2_tokenizer)


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
    processor = LapvqaProcessor(LapvqaImageProcessor(image_size=28), gpt2_tokenizer, task="vqa")
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
        LapvqaProcessor(LapvqaImageProcessor(image_size=28), gpt2_tokenizer, task="detection")


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
        match=r"report 0 has 300 tokens; with 2 special token\(s\) it needs 302 of the model's 200 learned positions \(102 too many\)",
    ):
        lapvqa_processor(images=image, text=" a" * 300)
