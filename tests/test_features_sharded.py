"""`accelerate launch -m lapvqa_hf.cli extract-features`: processes share the images out into one store, which reads
as a 1-process one and resumes after a kill, extracting only what is missing."""

import dataclasses
import json
import subprocess
import threading

import pytest
import torch
from conftest import accelerate_launch
from test_features_faults import count_encoded, write_images

from lapvqa_hf import LapvqaImageProcessor, LapvqaVisionConfig, LapvqaVisionModel
from lapvqa_hf.data import write_synthetic_mimic_diff_vqa
from lapvqa_hf.features import FeatureError, FeatureStore, extract_features, read_failures, recipe_for

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=28)
RECIPE = dataclasses.replace(recipe_for("lapvqa-vit-l14"), image_size=28, vis_dim=32)  # of the TINY encoder


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A synthetic release (10 images) and a 224 px encoder folder the lapvqa-vit-l14 recipe accepts."""
    folder = tmp_path_factory.mktemp("sharded")
    root = write_synthetic_mimic_diff_vqa(folder / "mimic", num_subjects=5, seed=3)
    config = LapvqaVisionConfig(
        image_size=224, patch_size=112, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    LapvqaVisionModel(config).save_pretrained(folder / "encoder")
    LapvqaImageProcessor(size={"height": 224, "width": 224}, resize_mode="stretch").save_pretrained(folder / "encoder")
    return root, folder / "encoder"


def launch(release, output, processes: int, returncode: int = 0) -> subprocess.CompletedProcess:
    """`lapvqa extract-features` under `accelerate launch` with `processes` CPU processes (DDP over gloo)."""
    root, encoder = release
    arguments = ["extract-features", "--encoder", "lapvqa-vit-l14", "--checkpoint", encoder, "--data-root", root]
    arguments += ["--output", output, "--shard-size", "2", "--batch-size", "1"]
    result = accelerate_launch("lapvqa_hf.cli", arguments, processes=processes, timeout=300)
    assert result.returncode == returncode, result.stderr[-3000:]
    return result


def manifest_of(folder) -> dict:
    return json.loads((folder / "features.json").read_text())


def assert_same_store(reference, folder) -> None:
    reference, store = FeatureStore(reference), FeatureStore(folder)
    assert len(store) == len(reference) == 10 and store.recipe == reference.recipe
    assert all(torch.equal(reference[image_id], store[image_id]) for image_id in reference._tensors)


@pytest.mark.slow
def test_two_processes_write_one_store_equal_to_a_one_process_run(release, tmp_path):
    single = launch(release, tmp_path / "one", 1)
    assert [shard["file"] for shard in manifest_of(tmp_path / "one")["shards"]] == [
        f"features-{index:05d}.safetensors" for index in range(5)
    ], "a 1-process run writes the store as a plain run does"
    double = launch(release, tmp_path / "two", 2)
    assert_same_store(tmp_path / "one", tmp_path / "two")
    shards = manifest_of(tmp_path / "two")["shards"]
    assert sorted(shard["file"] for shard in shards) == [
        *(f"features-r0-{index:05d}.safetensors" for index in range(3)),
        *(f"features-r1-{index:05d}.safetensors" for index in range(3)),
    ], "each process writes 5 images in shards of its own (2, 2 and 1)"
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == sorted(["features.json", *(s["file"] for s in shards)]), "no parts or temporary files are left"  # fmt: skip
    assert double.stdout.count("10 images encoded with lapvqa-vit-l14") == single.stdout.count("10 images") == 1


@pytest.mark.slow
def test_a_resumed_two_process_run_extracts_only_what_a_killed_process_left(release, tmp_path):
    launch(release, tmp_path / "reference", 2)
    launch(release, tmp_path / "features", 2)
    folder = tmp_path / "features"
    manifest = manifest_of(folder)
    # As if killed before the merge: process 0 finished its part, process 1 had written nothing.
    kept = [shard for shard in manifest["shards"] if shard["file"].startswith("features-r0-")]
    lost = [shard for shard in manifest["shards"] if shard["file"].startswith("features-r1-")]
    (folder / "features-part-r0.json").write_text(json.dumps({**manifest, "shards": kept, "failures": []}))
    (folder / "features.json").unlink()
    for shard in lost:
        (folder / shard["file"]).unlink()
    stamps = {shard["file"]: (folder / shard["file"]).stat().st_mtime_ns for shard in kept}

    launch(release, folder, 2)
    shards = manifest_of(folder)["shards"]
    assert [shard for shard in shards if shard in kept] == kept, "process 0's shards are kept as they were"
    assert {shard["file"]: (folder / shard["file"]).stat().st_mtime_ns for shard in kept} == stamps
    new = [shard for shard in shards if shard not in kept]
    assert sorted(i for shard in new for i in shard["ids"]) == sorted(i for shard in lost for i in shard["ids"])
    assert len({shard["file"] for shard in shards}) == len(shards) == 6, "new shards are named apart from kept ones"
    assert not (folder / "features-part-r0.json").exists()
    assert_same_store(tmp_path / "reference", folder)

    launch(release, folder, 2)  # a complete store: nothing to do
    assert manifest_of(folder)["shards"] == shards

    damaged = folder / shards[1]["file"]  # checked by process 1: its error stops process 0 too
    damaged.write_bytes(damaged.read_bytes()[:-3])
    result = launch(release, folder, 2, returncode=1)
    assert f"error: {damaged}: its sha256 differs from the one recorded in features.json" in result.stderr


# --- in one process: `world` processes simulated by threads ----------------------------------------------------------


def stretch() -> LapvqaImageProcessor:
    return LapvqaImageProcessor(size={"height": 28, "width": 28}, resize_mode="stretch")


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return LapvqaVisionModel(LapvqaVisionConfig(**TINY)).eval()


def extract_in_threads(images, folder, encoder, world: int = 2) -> None:
    barrier, errors = threading.Barrier(world), []

    def run(rank: int) -> None:
        try:
            extract_features(images, RECIPE, folder, encoder, stretch(), batch_size=2, shard_size=2, progress=False,
                             rank=rank, world=world, barrier=barrier.wait)  # fmt: skip
        except Exception as error:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_unreadable_images_of_every_process_are_listed_once_in_image_order(tmp_path, encoder):
    images = write_images(tmp_path / "images", 7)
    for index in (1, 2, 5):
        (tmp_path / "images" / f"cxr-{index}.png").write_bytes(b"")
    extract_in_threads(images, tmp_path / "features", encoder, world=3)
    assert [failure["image_id"] for failure in read_failures(tmp_path / "features")] == ["cxr-1", "cxr-2", "cxr-5"]
    assert sorted(FeatureStore(tmp_path / "features")._tensors) == ["cxr-0", "cxr-3", "cxr-4", "cxr-6"]
    assert not list((tmp_path / "features").glob("features-part-*")) and not list((tmp_path / "features").glob(".*"))


def test_a_plain_run_resumes_the_parts_of_a_killed_multi_process_run(tmp_path, encoder, monkeypatch):
    images = write_images(tmp_path / "images", 6)
    extract_in_threads(images, tmp_path / "reference", encoder)
    extract_in_threads(images, tmp_path / "features", encoder)
    folder = tmp_path / "features"
    manifest = manifest_of(folder)
    for rank in (0, 1):  # both processes wrote their parts, then were killed before the merge
        shards = [shard for shard in manifest["shards"] if shard["file"].startswith(f"features-r{rank}-")]
        (folder / f"features-part-r{rank}.json").write_text(json.dumps({**manifest, "shards": shards}))
    (folder / "features.json").unlink()
    calls = count_encoded(monkeypatch, encoder)
    extract_features(images, RECIPE, folder, encoder, stretch(), progress=False)
    assert calls == [], "every image was stored by a part"
    assert sorted(shard["file"] for shard in manifest_of(folder)["shards"]) == sorted(
        s["file"] for s in manifest["shards"]
    )
    assert not list(folder.glob("features-part-*"))
    reference, resumed = FeatureStore(tmp_path / "reference"), FeatureStore(folder)
    assert len(resumed) == 6 and all(torch.equal(reference[i], resumed[i]) for i in images)


def test_a_run_killed_while_merging_lists_each_shard_once(tmp_path, encoder, monkeypatch):
    images = write_images(tmp_path / "images", 5)
    extract_in_threads(images, tmp_path / "features", encoder)
    manifest = manifest_of(tmp_path / "features")  # merged, but the parts were not removed yet
    (tmp_path / "features" / "features-part-r1.json").write_text(json.dumps({**manifest, "failures": []}))
    calls = count_encoded(monkeypatch, encoder)
    extract_in_threads(images, tmp_path / "features", encoder)
    assert calls == [] and manifest_of(tmp_path / "features") == manifest
    assert not (tmp_path / "features" / "features-part-r1.json").exists()


def test_a_part_of_another_recipe_is_refused(tmp_path, encoder):
    images = write_images(tmp_path / "images", 2)
    extract_in_threads(images, tmp_path / "features", encoder)
    manifest = manifest_of(tmp_path / "features")
    other = {**manifest, "recipe": {**manifest["recipe"], "checkpoint": "someone/else"}}
    (tmp_path / "features" / "features-part-r1.json").write_text(json.dumps(other))
    with pytest.raises(FeatureError, match="holds features of another recipe"):
        extract_features(images, RECIPE, tmp_path / "features", encoder, stretch(), progress=False)


@pytest.mark.parametrize(("rank", "world"), [(2, 2), (-1, 2), (0, 0)])
def test_a_rank_outside_the_world_is_refused(tmp_path, encoder, rank, world):
    with pytest.raises(FeatureError, match=f"got rank {rank} of world {world}"):
        extract_features({}, RECIPE, tmp_path, encoder, stretch(), rank=rank, world=world)
