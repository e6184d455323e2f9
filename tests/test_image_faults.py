"""LapvqaImageProcessor under bad input: every image either loads upright, single-frame and finite in [0, 1], or is
refused with a one-line ValueError naming the file."""

import io
import struct
import zlib

import numpy as np
import pydicom
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from test_image_processing import write_dicom

from lapvqa_hf import LapvqaImageProcessor

FUZZ = settings(max_examples=80, deadline=None, database=None, derandomize=True)  # the same examples on every run


@pytest.fixture(scope="module")
def processor():
    # No normalization, so the tests read intensities in [0, 1] directly.
    return LapvqaImageProcessor(size=28, do_normalize=False)


def refusal(load, source) -> str:
    """The one-line ValueError message with which `load(source)` refuses its input."""
    with pytest.raises(ValueError) as error:
        load(source)
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


def check_loaded(image: np.ndarray) -> None:
    assert image.dtype == np.float32 and (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3))
    assert image.size and np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0


# --- orientation and frames ---------------------------------------------------------------------------------------

TALL = np.repeat(np.linspace(0, 250, 40).astype(np.uint8)[:, None], 20, axis=1)  # dark top, bright bottom
TALL[:, :4] = 255  # a bright band on the left edge


def with_orientation(path, fmt: str, orientation: int = 6):
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: the camera was turned; show the image rotated 90 degrees clockwise
    Image.fromarray(TALL).save(path, format=fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {}))
    return path


def test_exif_orientation_turns_jpeg_png_and_pil_images_upright(processor, tmp_path):
    upright = np.rot90(TALL, k=-1) / 255.0  # rotated clockwise: the bright band on top, dark to bright left to right
    jpeg = processor.load_image(with_orientation(tmp_path / "phone.jpg", "JPEG"))
    assert jpeg.shape == (20, 40) and np.abs(jpeg - upright).max() < 0.05
    png = processor.load_image(with_orientation(tmp_path / "export.png", "PNG"))
    assert np.allclose(png, upright)
    resized = processor(tmp_path / "export.png")["pixel_values"]  # read and resized in one go
    assert torch.allclose(resized, processor(upright.astype(np.float32))["pixel_values"], atol=1e-6)
    with Image.open(tmp_path / "export.png") as opened:
        assert np.allclose(processor.load_image(opened), upright), "a PIL image opened from a file is turned too"
    assert processor.load_rgb(tmp_path / "export.png").size == (40, 20)
    plain = processor.load_image(with_orientation(tmp_path / "plain.png", "PNG", orientation=1))
    assert np.allclose(plain, TALL / 255.0), "orientation 1 leaves the image as stored"


def test_an_mpo_phone_jpeg_is_read_as_its_primary_image(processor, tmp_path):
    preview = Image.fromarray(TALL[:10, :10])
    Image.fromarray(TALL).save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[preview])
    with Image.open(tmp_path / "phone.jpg") as opened:
        assert (opened.format, opened.n_frames) == ("MPO", 2)
    assert processor.load_image(tmp_path / "phone.jpg").shape == (40, 20)


@pytest.mark.parametrize(("name", "fmt"), [("pages.tiff", "TIFF"), ("cine.gif", "GIF"), ("animated.png", "PNG")])
def test_multi_page_and_animated_files_are_refused_with_their_frame_count(processor, tmp_path, name, fmt):
    frames = [Image.fromarray(TALL), Image.fromarray(255 - TALL), Image.fromarray(TALL // 2)]
    frames[0].save(tmp_path / name, format=fmt, save_all=True, append_images=frames[1:])
    message = refusal(processor.load_image, tmp_path / name)
    assert message.startswith(f"{tmp_path / name}: holds 3 frames (a multi-page or animated image)"), message
    assert refusal(processor, tmp_path / name) == message
    with Image.open(tmp_path / name) as opened:
        opened.seek(1)
        frame = processor.load_image(opened)  # a PIL image is read at its current frame (GIF frames come as RGB)
        assert np.allclose(frame if frame.ndim == 2 else frame[..., 0], (255 - TALL) / 255.0, atol=0.01)


def test_a_multi_frame_dicom_is_refused_with_its_frame_count(processor, tmp_path):
    path = write_dicom(tmp_path / "cine.dcm", np.zeros((4, 5)), "MONOCHROME2")
    dataset = pydicom.dcmread(path)
    dataset.NumberOfFrames = 3
    dataset.PixelData = np.arange(3 * 4 * 5, dtype=np.uint16).tobytes()
    dataset.save_as(path)
    assert refusal(processor.load_image, path) == (
        f"{path}: holds 3 frames (NumberOfFrames); expected a single-frame image."
    )


# --- intensities --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1000, 65535])
def test_a_constant_16_bit_image_is_scaled_by_its_bit_depth(processor, tmp_path, value):
    Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(tmp_path / "flat.png")
    for scaling in ("minmax", "full_range"):
        image = LapvqaImageProcessor(high_bit_depth_scaling=scaling).load_image(tmp_path / "flat.png")
        assert np.allclose(image, value / 65535.0), "one value has no range of its own: 16-bit scaling applies"
        pixels = processor(tmp_path / "flat.png", high_bit_depth_scaling=scaling)["pixel_values"]
        assert torch.allclose(pixels, torch.full_like(pixels, value / 65535.0)), "the same when read and resized"
    assert np.allclose(processor.load_image(np.full((8, 8), value, dtype=np.int32)), value / 65535.0)
    assert np.allclose(processor.load_image(np.full((8, 8), -5, dtype=np.int16)), 0.0), "below zero clips to black"


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_a_constant_dicom_is_mid_grey(processor, tmp_path, photometric):
    path = write_dicom(tmp_path / "flat.dcm", np.full((6, 6), 700), photometric, slope=2, intercept=-1024)
    assert np.array_equal(processor.load_image(path), np.full((6, 6), 0.5, dtype=np.float32))


def huge_png(path, width: int, height: int):
    """A small PNG whose header declares `width` x `height` pixels (its CRC fixed, so that PIL believes it)."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts at byte 16
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_decompression_bombs_are_refused_naming_the_file_and_the_limit(processor, tmp_path, monkeypatch):
    limit = Image.MAX_IMAGE_PIXELS
    bomb = huge_png(tmp_path / "bomb.png", 100_000, 100_000)
    assert refusal(processor.load_image, bomb) == (
        f"{bomb}: the image has more pixels than the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS, a guard against "
        "decompression bombs); raise that limit to read it."
    )
    # Between the limit and twice it PIL only warns: refused the same.
    assert "more pixels than the limit of" in refusal(
        processor.load_image, huge_png(tmp_path / "big.png", 10_000, 10_000)
    )
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 20 - 1)
    Image.fromarray(TALL).save(tmp_path / "tall.png")
    assert f"{tmp_path / 'tall.png'}: the image has more pixels than the limit of 799 " in refusal(
        processor.load_image, tmp_path / "tall.png"
    )
    dicom = write_dicom(tmp_path / "tall.dcm", TALL, "MONOCHROME2")
    assert refusal(processor.load_image, dicom).startswith(f"{dicom}: 40 x 20 pixels exceed the limit of 799 ")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's own switch turns the guard off
    assert processor.load_image(tmp_path / "tall.png").shape == (40, 20)


# --- DICOM attributes ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        (dict(slope="NaN"), "RescaleSlope is 'NaN'; expected a finite number."),
        (dict(slope="inf"), "RescaleSlope is 'inf'; expected a finite number."),
        (dict(slope=0), "RescaleSlope is 0, which maps every pixel to one value; expected a non-zero slope."),
        (dict(intercept="-inf"), "RescaleIntercept is '-inf'; expected a finite number."),
        (dict(window=("NaN", 100)), "WindowCenter is 'NaN'; expected a finite number."),
        (dict(window=(2000, "inf")), "WindowWidth is 'inf'; expected a finite number."),
        (dict(window=(2000, 0)), "WindowWidth is 0; expected a positive width."),
        (dict(window=(2000, -10)), "WindowWidth is -10; expected a positive width."),
        (
            dict(slope=1e308),
            "the pixel values are NaN or infinite after the modality LUT (RescaleSlope, RescaleIntercept); the file "
            "is not a valid X-ray.",
        ),
    ],
)
def test_dicom_with_a_non_finite_rescale_or_window_is_refused_naming_the_attribute(
    processor, tmp_path, attributes, expected
):
    path = write_dicom(tmp_path / "bad.dcm", np.tile(np.arange(4) * 1000, (4, 1)), "MONOCHROME2", **attributes)
    assert refusal(processor.load_image, path) == f"{path}: {expected}"


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_a_window_is_only_checked_where_it_applies(processor, tmp_path):
    """With a VOI LUT the window is not used: a broken one does not make the image unreadable."""
    path = write_dicom(
        tmp_path / "lut.dcm", np.eye(4, dtype=int), "MONOCHROME2", voi_lut=(0, [0, 50, 100]), window=(1, "NaN")
    )
    assert np.allclose(processor.load_image(path), np.eye(4))


def test_non_finite_float_dicom_pixels_are_refused(processor, tmp_path):
    path = write_dicom(tmp_path / "float.dcm", np.zeros((2, 2)), "MONOCHROME2")
    dataset = pydicom.dcmread(path)
    del dataset.PixelData, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation
    dataset.BitsAllocated = 32
    dataset.FloatPixelData = np.array([[0.0, 1.0], [np.nan, 2.0]], dtype=np.float32).tobytes()
    dataset.save_as(path)
    assert refusal(processor.load_image, path) == (
        f"{path}: the pixel values are NaN or infinite in the pixel data; the file is not a valid X-ray."
    )


def test_a_truncated_file_opened_lazily_by_pil_is_refused_like_its_path(processor, tmp_path):
    Image.fromarray(TALL).save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "half.png").write_bytes(whole[: len(whole) // 2])
    assert refusal(processor.load_image, tmp_path / "half.png").startswith(
        f"{tmp_path / 'half.png'}: cannot read it as an image (PNG, JPEG or DICOM expected): "
    )
    with Image.open(tmp_path / "half.png") as opened:
        assert refusal(processor.load_image, opened).startswith("PIL image: cannot decode it: ")


def test_a_bfloat16_tensor_is_read_like_its_float32_values(processor):
    values = torch.linspace(0, 1, 64).reshape(8, 8).to(torch.bfloat16)
    assert np.array_equal(processor.load_image(values), values.float().numpy())
    assert "unsupported pixel type complex64" in refusal(processor.load_image, torch.zeros(4, 4, dtype=torch.cfloat))


# --- fuzzing: whatever comes in, a finite image or a one-line ValueError ------------------------------------------


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> dict[str, bytes]:
    """One valid file of each format the loader reads, as bytes, keyed by suffix."""
    folder = tmp_path_factory.mktemp("valid")
    gradient = (np.arange(24 * 20).reshape(24, 20) * 90).astype(np.uint16)
    Image.fromarray((gradient // 256).astype(np.uint8)).save(folder / "8bit.png")
    Image.fromarray(gradient).save(folder / "16bit.png")
    Image.fromarray((gradient // 256).astype(np.uint8)).save(folder / "x.jpg")
    Image.fromarray(np.stack([gradient // 256] * 3, axis=-1).astype(np.uint8)).save(folder / "x.tiff")
    write_dicom(folder / "x.dcm", gradient % 4096, "MONOCHROME1", slope=2, intercept=-10, window=(3000, 4000))
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def check_file(processor, path) -> None:
    try:
        image = processor.load_image(path)
    except ValueError as error:
        message = str(error)
        assert "\n" not in message and str(path) in message, message
        assert refusal(processor, path) == message, "read and resized in one go, the same refusal"
        return
    check_loaded(image)
    pixels = processor(path)["pixel_values"]
    assert pixels.shape == (1, 3, 28, 28) and torch.isfinite(pixels).all()


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's and pydicom's on broken files
@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from(["png", "jpg", "dcm", "tiff", "gif", "bin", ""]))
def test_random_bytes_are_refused_naming_the_file(processor, scratch, data, suffix):
    path = scratch / f"random.{suffix}" if suffix else scratch / "random"
    path.write_bytes(data)
    check_file(processor, path)


@pytest.mark.filterwarnings("ignore::UserWarning")
@FUZZ
@given(
    name=st.sampled_from(["8bit.png", "16bit.png", "x.jpg", "x.tiff", "x.dcm"]),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=4),
)
def test_truncated_or_corrupted_files_load_or_are_refused(processor, valid_files, scratch, name, cut, flips):
    data = bytearray(valid_files[name])
    for where, byte in flips:
        data[int(where * len(data))] = byte
    path = scratch / f"damaged-{name}"
    path.write_bytes(bytes(data[: int(cut * len(data)) or 1]))
    check_file(processor, path)


DTYPES = st.sampled_from(
    "bool uint8 int8 uint16 int16 uint32 int32 uint64 int64 float16 float32 float64 complex64 datetime64[s] U1".split()
)
SIDE = st.integers(1, 6)
SHAPES = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),  # anything: scalars, empty, 4-D
    st.tuples(SIDE, SIDE),
    st.tuples(SIDE, SIDE, st.sampled_from([1, 3, 4])),
    st.tuples(st.sampled_from([1, 3]), SIDE, SIDE),
)
ARRAYS = st.one_of(
    DTYPES.flatmap(lambda dtype: hnp.arrays(np.dtype(dtype), SHAPES)),  # any values: NaN, inf, extremes
    hnp.arrays(st.sampled_from(["float16", "float32", "float64"]), SHAPES, elements=st.floats(0, 1, width=16)),
)


def loaded_or_refused(load, source) -> np.ndarray | None:
    try:
        return load(source)
    except ValueError as error:
        assert str(error) and "\n" not in str(error), str(error)
        return None


@FUZZ
@given(array=ARRAYS)
def test_any_array_loads_finite_in_0_1_or_is_refused(processor, array):
    image = loaded_or_refused(processor.load_image, array)
    if image is not None:
        check_loaded(image)


@FUZZ
@given(array=ARRAYS, as_tensor=st.booleans())
def test_the_processor_gives_finite_pixel_values_or_refuses(processor, array, as_tensor):
    if as_tensor and array.dtype.kind in "biuf" and array.dtype != np.uint64:
        array = torch.from_numpy(array.copy())
    pixels = loaded_or_refused(processor, array)
    if pixels is not None:
        values = pixels["pixel_values"]
        assert values.shape == (1, 3, 28, 28) and values.dtype == torch.float32 and torch.isfinite(values).all()
