"""`lapvqa extract-features` and FeatureStore under bad input: nonsensical options are refused up front, unreadable
images are skipped and listed, damaged shards are named with their fix, and non-finite features are never stored."""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lapvqa_hf import LapvqaImageProcessor, LapvqaVisionConfig, LapvqaVisionModel
from lapvqa_hf.features import FAILURES, FeatureError, FeatureStore, extract_features, read_failures, recipe_for

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=28)
RECIPE = dataclasses.replace(recipe_for("lapvqa-vit-l14"), image_size=28, vis_dim=32)  # of the TINY encoder
FIX = "delete it and re-run `lapvqa extract-features` into"


def stretch(size: int = 28) -> LapvqaImageProcessor:
    return LapvqaImageProcessor(size={"height": size, "width": size}, resize_mode="stretch")


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return LapvqaVisionModel(LapvqaVisionConfig(**TINY)).eval()


def write_images(folder, count: int) -> dict[str, str]:
    folder.mkdir(exist_ok=True)
    generator = np.random.default_rng(0)
    images = {}
    for index in range(count):
        path = folder / f"cxr-{index}.png"
        Image.fromarray(generator.integers(0, 256, (32, 40), dtype=np.uint8)).save(path)
        images[f"cxr-{index}"] = str(path)
    return images


def count_encoded(monkeypatch, encoder) -> list[int]:
    """The number of images of every encoder call from now on."""
    calls, forward = [], encoder.forward

    def counting(pixel_values, **kwargs):
        calls.append(len(pixel_values))
        return forward(pixel_values, **kwargs)

    monkeypatch.setattr(encoder, "forward", counting)
    return calls


def extract(images, folder, encoder, **options):
    options = {"batch_size": 2, "shard_size": 3, "progress": False, **options}
    return extract_features(images, RECIPE, folder, encoder, stretch(), **options)


def manifest_of(folder) -> dict:
    return json.loads((folder / "features.json").read_text())


def refusal(call, *args, **kwargs) -> str:
    """The one-line FeatureError message with which `call(*args, **kwargs)` refuses."""
    with pytest.raises(FeatureError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message, message
    return message


# --- options ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (dict(batch_size=-1), "batch_size must be a positive number of images, got -1."),
        (dict(batch_size=0), "batch_size must be a positive number of images, got 0."),
        (dict(batch_size=2.5), "batch_size must be a positive number of images, got 2.5."),
        (dict(shard_size=0), "shard_size must be a positive number of images, got 0."),
        (dict(device="gpu"), "device must be a torch device such as cpu, cuda or cuda:1, got 'gpu'."),
    ],
)
def test_nonsensical_options_are_refused_before_anything_is_written(tmp_path, encoder, options, expected):
    images = write_images(tmp_path / "images", 2)
    assert refusal(extract, images, tmp_path / "features", encoder, **options) == expected
    assert not (tmp_path / "features").exists()


def test_a_gpu_this_machine_lacks_is_refused(tmp_path, encoder):
    message = refusal(extract, write_images(tmp_path / "images", 1), tmp_path / "features", encoder, device="cuda:99")
    assert message.startswith("device 'cuda:99' asked for, but ")
    assert not (tmp_path / "features").exists()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--batch-size", "-1"], "error: --batch-size must be a positive number of images, got -1.\n"),
        (["--batch-size", "0"], "error: --batch-size must be a positive number of images, got 0.\n"),
        (["--shard-size", "0"], "error: --shard-size must be a positive number of images, got 0.\n"),
        (["--device", "gpu"], "error: device must be a torch device such as cpu, cuda or cuda:1, got 'gpu'.\n"),
    ],
)
def test_the_cli_refuses_nonsensical_options_in_one_line_before_loading_anything(tmp_path, capsys, options, expected):
    from lapvqa_hf.cli import main as lapvqa

    # Neither the reports file nor the checkpoint exists: the options are checked before either is read.
    args = ["extract-features", "--encoder", "lapvqa-vit-l14", "--reports", str(tmp_path / "missing.jsonl")]
    args += ["--checkpoint", str(tmp_path / "no-encoder"), "--output", str(tmp_path / "features")]
    assert lapvqa([*args, *options]) == 1
    assert capsys.readouterr().err == expected
    assert not (tmp_path / "features").exists()


# --- unreadable images --------------------------------------------------------------------------------------------


def test_unreadable_images_are_skipped_listed_and_retried(tmp_path, encoder, monkeypatch):
    images = write_images(tmp_path / "images", 6)
    extract(images, tmp_path / "reference", encoder)
    good = dict(images)
    (tmp_path / "images" / "cxr-1.png").write_bytes(b"not a png")
    (tmp_path / "images" / "cxr-4.png").unlink()

    extract(images, tmp_path / "features", encoder)
    store = FeatureStore(tmp_path / "features")
    assert sorted(store._tensors) == ["cxr-0", "cxr-2", "cxr-3", "cxr-5"], "the readable ones are extracted"
    failures = read_failures(tmp_path / "features")
    assert [(f["image_id"], f["path"]) for f in failures] == [("cxr-1", images["cxr-1"]), ("cxr-4", images["cxr-4"])]
    assert failures[0]["reason"].startswith(f"{images['cxr-1']}: cannot read it as an image")
    assert failures[1]["reason"] == f"{images['cxr-4']}: no such image file."
    assert not list((tmp_path / "features").glob(".*")), "failures.json is written atomically"

    write_images(tmp_path / "images", 6)  # the two images are repaired
    calls = count_encoded(monkeypatch, encoder)
    extract(images, tmp_path / "features", encoder)
    assert sum(calls) == 2, "a later run retries the failed images only"
    assert not (tmp_path / "features" / FAILURES).exists() and read_failures(tmp_path / "features") == []
    reference, repaired = FeatureStore(tmp_path / "reference"), FeatureStore(tmp_path / "features")
    assert all(torch.equal(reference[i], repaired[i]) for i in good)


def test_a_shard_of_only_unreadable_images_is_not_written(tmp_path, encoder):
    images = write_images(tmp_path / "images", 4)
    for index in (0, 1, 2):
        (tmp_path / "images" / f"cxr-{index}.png").write_bytes(b"")
    extract(images, tmp_path / "features", encoder)
    manifest = manifest_of(tmp_path / "features")
    assert [(shard["file"], shard["ids"]) for shard in manifest["shards"]] == [
        ("features-00000.safetensors", ["cxr-3"])
    ]
    assert len(read_failures(tmp_path / "features")) == 3


def test_the_cli_summary_lists_the_skipped_images(tmp_path, capsys):
    from lapvqa_hf.cli import main as lapvqa

    config = LapvqaVisionConfig(
        image_size=224, patch_size=112, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    LapvqaVisionModel(config).save_pretrained(tmp_path / "encoder")
    stretch(224).save_pretrained(tmp_path / "encoder")
    images = {key: str(Path(path).resolve()) for key, path in write_images(tmp_path / "images", 3).items()}
    (tmp_path / "images" / "cxr-1.png").write_text("a note, not an image")
    lines = [json.dumps({"image": path, "report": "No effusion."}) for path in images.values()]
    (tmp_path / "reports.jsonl").write_text("\n".join(lines))
    args = ["extract-features", "--encoder", "lapvqa-vit-l14", "--checkpoint", str(tmp_path / "encoder")]
    args += ["--reports", str(tmp_path / "reports.jsonl"), "--output", str(tmp_path / "f"), "--shard-size", "2"]
    assert lapvqa(args) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(
        f"{tmp_path / 'f'}: 2 images encoded with lapvqa-vit-l14; 1 unreadable images skipped, listed in "
        f"{tmp_path / 'f' / 'failures.json'} (a re-run retries them): {images['cxr-1']}: {images['cxr-1']}: cannot "
        "read it as an image"
    ), out
    assert len(FeatureStore(tmp_path / "f")) == 2


# --- damaged stores -----------------------------------------------------------------------------------------------


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip_last_byte(data: bytes) -> bytes:  # in the tensor data
    return data[:-1] + bytes([data[-1] ^ 0x01])


def flip_header_byte(data: bytes) -> bytes:
    return data[:20] + bytes([data[20] ^ 0x20]) + data[21:]


def garbage(data: bytes) -> bytes:
    return b"garbage"


@pytest.mark.parametrize("damage", [truncate, flip_last_byte, flip_header_byte, garbage])
def test_a_damaged_shard_is_named_with_its_fix_and_re_extracted_once_deleted(tmp_path, encoder, monkeypatch, damage):
    images = write_images(tmp_path / "images", 7)
    extract(images, tmp_path / "reference", encoder)
    extract(images, tmp_path / "features", encoder)
    shard = tmp_path / "features" / "features-00001.safetensors"
    shard.write_bytes(damage(shard.read_bytes()))

    expected = (
        f"{shard}: its sha256 differs from the one recorded in features.json (truncated or changed); {FIX} "
        f"{tmp_path / 'features'}, which extracts its images again."
    )
    assert refusal(FeatureStore, tmp_path / "features") == expected
    assert refusal(extract, images, tmp_path / "features", encoder) == expected, "a re-run does not trust it either"

    shard.unlink()
    calls = count_encoded(monkeypatch, encoder)
    extract(images, tmp_path / "features", encoder)
    assert sum(calls) == 3, "the images of the deleted shard, and only those, are extracted again"
    reference, repaired = FeatureStore(tmp_path / "reference"), FeatureStore(tmp_path / "features")
    assert len(repaired) == 7 and all(torch.equal(reference[i], repaired[i]) for i in images)
    assert sorted(shard["file"] for shard in manifest_of(tmp_path / "features")["shards"]) == [
        "features-00000.safetensors",
        "features-00001.safetensors",
        "features-00002.safetensors",
    ]


def rewrite_shard(folder, name: str, tensors: dict, ids: list[str] | None = None, checksum: bool = True) -> None:
    """Replaces a shard with `tensors`, its manifest entry updated as if an older lapvqa-hf had written it."""
    save_file(tensors, folder / name)
    manifest = manifest_of(folder)
    for shard in manifest["shards"]:
        if shard["file"] == name:
            shard["ids"] = list(tensors) if ids is None else ids
            shard["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
            if not checksum:
                del shard["sha256"]
    (folder / "features.json").write_text(json.dumps(manifest))


def test_stores_without_checksums_are_read_unverified(tmp_path, encoder):
    images = write_images(tmp_path / "images", 4)
    extract(images, tmp_path / "features", encoder)
    reference = FeatureStore(tmp_path / "features")
    manifest = manifest_of(tmp_path / "features")
    assert all(len(shard["sha256"]) == 64 for shard in manifest["shards"])
    for shard in manifest["shards"]:
        del shard["sha256"]  # as lapvqa-hf 0.2.0 wrote it
    (tmp_path / "features" / "features.json").write_text(json.dumps(manifest))
    store = FeatureStore(tmp_path / "features")
    assert all(torch.equal(reference[i], store[i]) for i in images)
    shard = tmp_path / "features" / "features-00000.safetensors"
    shard.write_bytes(truncate(shard.read_bytes()))
    assert refusal(FeatureStore, tmp_path / "features").startswith(f"{shard}: not a readable safetensors file (")


@pytest.mark.parametrize("checksum", [True, False])
def test_non_finite_or_misshapen_features_in_a_shard_are_refused(tmp_path, encoder, checksum):
    images = write_images(tmp_path / "images", 3)
    folder = tmp_path / "features"
    extract(images, folder, encoder)
    stored = dict(FeatureStore(folder)._tensors)
    shard = folder / "features-00000.safetensors"

    nan = {**stored, "cxr-1": torch.full_like(stored["cxr-1"], float("nan"))}
    rewrite_shard(folder, shard.name, nan, checksum=checksum)
    assert refusal(FeatureStore, folder) == (
        f"{shard}: the features of image 'cxr-1' are NaN or infinite; {FIX} {folder}, which extracts its images again."
    )
    narrow = {**stored, "cxr-2": stored["cxr-2"][:, :8].contiguous()}
    rewrite_shard(folder, shard.name, narrow, checksum=checksum)
    assert refusal(FeatureStore, folder).startswith(
        f"{shard}: the features of image 'cxr-2' are [4, 8], expected [num_patches, 32]; {FIX}"
    )
    # An earlier lapvqa-hf with --batch-size -1 listed images in shards that held nothing: not trusted.
    rewrite_shard(folder, shard.name, {}, ids=list(images), checksum=checksum)
    assert refusal(FeatureStore, folder).startswith(
        f"{shard}: holds the features of 0 images, not those of the 3 that features.json lists for it; {FIX}"
    )


def test_a_shard_missing_from_disk_is_named(tmp_path, encoder):
    images = write_images(tmp_path / "images", 2)
    extract(images, tmp_path / "features", encoder)
    (tmp_path / "features" / "features-00000.safetensors").unlink()
    assert refusal(FeatureStore, tmp_path / "features") == (
        f"{tmp_path / 'features' / 'features-00000.safetensors'}: missing, though features.json lists it; re-run "
        f"`lapvqa extract-features` into {tmp_path / 'features'}, which extracts its images again."
    )


@pytest.mark.parametrize("content", ["{not json", '{"recipe": {"name": "siglip"}, "shards": []}', '{"shards": [{}]}'])
def test_a_damaged_manifest_is_refused_in_one_line(tmp_path, encoder, content):
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "features.json").write_text(content)
    expected = f"{tmp_path / 'features' / 'features.json'}: not a features manifest ("
    assert refusal(FeatureStore, tmp_path / "features").startswith(expected)
    assert refusal(extract, write_images(tmp_path / "images", 1), tmp_path / "features", encoder).startswith(expected)


# --- non-finite features ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (float("nan"), "NaN or infinite features"),
        (float("inf"), "NaN or infinite features"),
        (1e6, "features beyond the fp16 range (|x| > 65504)"),
    ],
)
def test_non_finite_features_from_the_encoder_are_not_stored(tmp_path, encoder, monkeypatch, value, problem):
    images = write_images(tmp_path / "images", 5)
    calls, forward = [], encoder.forward

    def poisoned(pixel_values, **kwargs):
        outputs = forward(pixel_values, **kwargs)
        calls.append(len(pixel_values))
        if len(calls) == 3:  # batches (cxr-0, cxr-1), (cxr-2) make the first shard; then (cxr-3, cxr-4)
            outputs.last_hidden_state[1, 1, 3] = value
        return outputs

    monkeypatch.setattr(encoder, "forward", poisoned)
    message = refusal(extract, images, tmp_path / "features", encoder)
    assert message.startswith(f"the lapvqa-vit-l14 encoder gave {problem} for image 'cxr-4' ({images['cxr-4']}); ")
    assert [shard["ids"] for shard in manifest_of(tmp_path / "features")["shards"]] == [["cxr-0", "cxr-1", "cxr-2"]]
    assert len(FeatureStore(tmp_path / "features")) == 3, "the shards before it are kept; nothing of its own"


def test_the_store_gets_the_users_umask_permissions(tmp_path):
    import os
    import stat

    from lapvqa_hf.files import write_json_atomically

    previous = os.umask(0o022)
    try:
        write_json_atomically(tmp_path / "features.json", {"shards": []})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "features.json").stat().st_mode) == 0o644
