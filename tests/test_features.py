"""`lapvqa extract-features`: frozen patch tokens per image, fp16 shards, one recipe per encoder, resumable."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Owlv2VisionConfig,
    Owlv2VisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from lapvqa_hf import LapvqaImageProcessor, LapvqaVisionConfig, LapvqaVisionModel
from lapvqa_hf.data import load_mimic_cxr_reports, load_mimic_diff_vqa, write_synthetic_mimic_diff_vqa
from lapvqa_hf.features import (
    FeatureError,
    FeatureStore,
    extract_features,
    images_of,
    recipe_for,
)
from lapvqa_hf.models.encoders import ENCODER_WIDTHS, RECIPES, EncoderError


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = write_synthetic_mimic_diff_vqa(tmp_path_factory.mktemp("mimic"), num_subjects=5, seed=2)
    rows = [row for split in load_mimic_diff_vqa(root).values() for row in split]
    return root, images_of(rows, root=root)


def stretch(size: int = 28) -> LapvqaImageProcessor:
    """The image processor a tiny LapvqaVisionModel's folder would carry (the converter saves one)."""
    return LapvqaImageProcessor(size={"height": size, "width": size}, resize_mode="stretch")


def tiny(recipe_name: str, **changes):
    """A recipe shrunk to a tiny random encoder of the same class."""
    import dataclasses

    return dataclasses.replace(recipe_for(recipe_name), **changes)


def test_every_known_encoder_has_one_recipe_with_its_width():
    assert set(RECIPES) == set(ENCODER_WIDTHS)
    for name, recipe in RECIPES.items():
        assert recipe.vis_dim == ENCODER_WIDTHS[name]
    with pytest.raises(FeatureError, match="unknown encoder 'resnet'"):
        recipe_for("resnet")


def test_lapvqa_encoder_features_equal_the_model_output(release, tmp_path):
    root, images = release
    assert len(images) == 10  # 5 subjects x 2 studies, frontal images only
    config = LapvqaVisionConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96, image_size=28
    )
    encoder = LapvqaVisionModel(config).eval()
    recipe = tiny("lapvqa-vit-l14", image_size=28, vis_dim=64)
    extract_features(
        images, recipe, tmp_path / "features", encoder, stretch(), batch_size=3, shard_size=8, progress=False
    )
    store = FeatureStore(tmp_path / "features")
    assert len(store) == 10 and store.recipe == recipe
    manifest = json.loads((tmp_path / "features" / "features.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["features-00000.safetensors", "features-00001.safetensors"]
    image_id = next(iter(images))
    pixels = LapvqaImageProcessor().encoder_pixel_values(images[image_id], stretch())  # read as 8-bit RGB, then
    with torch.no_grad():  # prepared by the encoder's own processor
        expected = encoder(pixels).last_hidden_state[0]
    assert store[image_id].dtype == torch.float16 and store[image_id].shape == (4, 64)
    assert torch.allclose(store[image_id].float(), expected, atol=1e-2)


@pytest.mark.parametrize(
    ("name", "model", "patches"),
    [
        (
            "clip-vit-l14",
            lambda: CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=32,
                    intermediate_size=37,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    image_size=28,
                    patch_size=14,
                )
            ),
            4,
        ),
        (
            "owlv2",
            lambda: Owlv2VisionModel(
                Owlv2VisionConfig(
                    hidden_size=32,
                    intermediate_size=37,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    image_size=28,
                    patch_size=14,
                )
            ),
            4,
        ),
        (
            "siglip",
            lambda: SiglipVisionModel(
                SiglipVisionConfig(
                    hidden_size=32,
                    intermediate_size=37,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    image_size=28,
                    patch_size=14,
                )
            ),
            4,
        ),
    ],
)
def test_transformers_encoders_follow_their_recipe(release, tmp_path, name, model, patches):
    _, images = release
    recipe = tiny(name, image_size=28, vis_dim=32)
    processor = CLIPImageProcessor(size={"height": 28, "width": 28}, do_center_crop=False)  # each one's own, tiny
    extract_features(dict(list(images.items())[:3]), recipe, tmp_path, model(), processor, progress=False)
    store = FeatureStore(tmp_path)
    # CLIP and OWLv2 have a CLS token, dropped by their recipes; SigLIP has none: all give the 2x2 patch grid.
    assert {tuple(store[i].shape) for i in list(images)[:3]} == {(patches, 32)}


def test_extraction_resumes_after_a_crash_and_matches_an_uninterrupted_run(release, tmp_path, monkeypatch):
    _, images = release
    config = LapvqaVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=28
    )
    encoder = LapvqaVisionModel(config).eval()
    recipe = tiny("lapvqa-vit-l14", image_size=28, vis_dim=32)
    extract_features(images, recipe, tmp_path / "reference", encoder=encoder, image_processor=stretch(), shard_size=6,
                     progress=False)  # fmt: skip

    calls = []
    original_forward = encoder.forward

    def crash_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return original_forward(*args, **kwargs)

    monkeypatch.setattr(encoder, "forward", crash_on_third_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_features(
            images, recipe, tmp_path / "resumed", encoder, stretch(), batch_size=3, shard_size=6, progress=False
        )
    assert len(FeatureStore(tmp_path / "resumed")) == 6, "the first shard survived the crash"
    calls.clear()
    extract_features(images, recipe, tmp_path / "resumed", encoder=encoder, image_processor=stretch(), batch_size=3,
                     shard_size=6, progress=False)  # fmt: skip
    assert len(calls) == 2, "only the 4 images not yet stored were encoded (batches of 3 and 1)"
    reference, resumed = FeatureStore(tmp_path / "reference"), FeatureStore(tmp_path / "resumed")
    assert len(resumed) == 10 and all(torch.equal(reference[i], resumed[i]) for i in images)
    assert not list((tmp_path / "resumed").glob(".*")), "no temporary files are left behind"


def test_features_of_another_recipe_are_not_mixed(release, tmp_path):
    _, images = release
    config = LapvqaVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=28
    )
    recipe = tiny("lapvqa-vit-l14", image_size=28, vis_dim=32)
    subset = dict(list(images.items())[:2])
    extract_features(subset, recipe, tmp_path, LapvqaVisionModel(config), stretch(), progress=False)
    with pytest.raises(FeatureError, match="holds features of another recipe"):
        extract_features(
            subset,
            tiny("lapvqa-vit-l14", image_size=56, vis_dim=32),
            tmp_path,
            encoder=LapvqaVisionModel(config),
            progress=False,
        )


def test_a_store_of_differently_prepared_images_is_not_resumed(release, tmp_path):
    _, images = release
    recipe = tiny("lapvqa-vit-l14", image_size=28, vis_dim=32)
    (tmp_path / "features.json").write_text(json.dumps({"recipe": dataclasses.asdict(recipe), "shards": []}))
    with pytest.raises(FeatureError, match="holds features of images prepared otherwise"):
        extract_features(images, recipe, tmp_path, image_processor=stretch(), progress=False)


def test_wrong_encoder_width_is_refused(release, tmp_path):
    _, images = release
    config = LapvqaVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=28
    )
    with pytest.raises(EncoderError, match=r"expects \[batch, patches, 1024\] tokens, the encoder gave \[1, 4, 32\]"):
        extract_features(
            dict(list(images.items())[:1]),
            tiny("lapvqa-vit-l14", image_size=28),
            tmp_path,
            encoder=LapvqaVisionModel(config),
            image_processor=stretch(),
            progress=False,
        )


def test_cli_extracts_from_a_release_with_a_local_checkpoint(release, tmp_path, capsys):
    from lapvqa_hf.cli import main as lapvqa

    root, images = release
    config = LapvqaVisionConfig(
        image_size=28, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, hidden_size=1024
    )
    LapvqaVisionModel(config).save_pretrained(tmp_path / "encoder")
    stretch().save_pretrained(tmp_path / "encoder")
    # The recipe feeds 224 px images: a 28 px checkpoint is refused before anything is encoded.
    args = [
        "extract-features",
        "--encoder",
        "lapvqa-vit-l14",
        "--data-root",
        str(root),
        "--output",
        str(tmp_path / "f"),
    ]
    assert lapvqa([*args, "--checkpoint", str(tmp_path / "encoder")]) == 1
    assert "recipe feeds 224 px images, but this encoder takes 28 px" in capsys.readouterr().err
    config = LapvqaVisionConfig(
        image_size=224, patch_size=112, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    LapvqaVisionModel(config).save_pretrained(tmp_path / "encoder224")
    stretch(224).save_pretrained(tmp_path / "encoder224")
    assert lapvqa([*args, "--checkpoint", str(tmp_path / "encoder224")]) == 0
    assert f"{len(images)} images encoded with lapvqa-vit-l14" in capsys.readouterr().out
    assert FeatureStore(tmp_path / "f")[next(iter(images))].shape == (4, 1024)


def tiny_florence2() -> Florence2ForConditionalGeneration:
    """A random Florence-2 with a 4-stage DaViT (stride 32, as Florence-2-large) of tiny widths."""
    four = [1, 1, 1, 1]
    vision = dict(depths=four, num_heads=four, num_groups=four, embed_dim=[8, 8, 8, 16], projection_dim=1024)
    text = dict(model_type="bart", vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1)
    text |= dict(encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)
    torch.manual_seed(0)
    return Florence2ForConditionalGeneration(Florence2Config(vision_config=vision, text_config=text)).eval()


def test_florence2_recipe_through_the_cli(release, tmp_path, capsys):
    from lapvqa_hf.cli import main as lapvqa

    _, images = release
    model = tiny_florence2()
    model.save_pretrained(tmp_path / "florence2")
    # Florence-2's own processor: 768 x 768, no crop, ImageNet normalisation
    processor = CLIPImageProcessor(size={"height": 768, "width": 768}, do_center_crop=False,
                                   image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)  # fmt: skip
    processor.save_pretrained(tmp_path / "florence2")
    image = next(iter(images.values()))  # one image (768 px costs): a plain image, report file
    (tmp_path / "reports.jsonl").write_text(json.dumps({"image": image, "report": "No effusion."}))
    args = ["extract-features", "--encoder", "florence2", "--reports", str(tmp_path / "reports.jsonl")]
    assert lapvqa([*args, "--checkpoint", str(tmp_path / "florence2"), "--output", str(tmp_path / "f")]) == 0
    assert "1 images encoded with florence2" in capsys.readouterr().out
    store = FeatureStore(tmp_path / "f")
    assert store.recipe.checkpoint == str(tmp_path / "florence2"), "the encoder used is recorded with the features"
    # 768 px / 32 = 24 x 24 DaViT tokens, plus their mean first; projected to 1024 and normed.
    assert store[image].shape == (1 + 24 * 24, 1024)
    pixels = LapvqaImageProcessor().encoder_pixel_values(image, processor)
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixels).pooler_output[0]
    assert torch.allclose(store[image].float(), expected, atol=1e-2)


def test_coca_features_come_from_the_converted_image_tower_without_open_clip(release, tmp_path, capsys, monkeypatch):
    from test_coca_encoder import converted_tiny_coca

    from lapvqa_hf import LapvqaCocaVisionModel
    from lapvqa_hf.cli import main as lapvqa

    root, images = release
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` would raise ImportError
    folder = converted_tiny_coca(tmp_path / "coca")
    args = ["extract-features", "--encoder", "coca", "--data-root", str(root), "--output", str(tmp_path / "f")]
    assert lapvqa([*args, "--checkpoint", str(folder)]) == 0
    assert f"{len(images)} images encoded with coca" in capsys.readouterr().out
    image_id, path = next(iter(images.items()))
    store = FeatureStore(tmp_path / "f")
    assert store.recipe.checkpoint == str(folder) and store[image_id].shape == (8, 768), "9 queries, the first pooled"
    processor = CLIPImageProcessor.from_pretrained(folder)
    pixels = LapvqaImageProcessor().encoder_pixel_values(LapvqaImageProcessor().load_rgb(path), processor)
    with torch.no_grad():
        expected = LapvqaCocaVisionModel.from_pretrained(folder)(pixels).last_hidden_state[0]
    torch.testing.assert_close(store[image_id].float(), expected, atol=2e-3, rtol=1e-2)  # stored as fp16


def test_the_coca_recipe_without_its_encoder_repo_says_what_it_needed(release, tmp_path, capsys):
    from lapvqa_hf.cli import main as lapvqa

    root, _ = release  # offline, with an empty Hugging Face cache: dmusingu/lapvqa-coca-vit-l14 cannot be fetched
    args = ["extract-features", "--encoder", "coca", "--data-root", str(root), "--output", str(tmp_path / "f")]
    assert lapvqa(args) == 1
    err = capsys.readouterr().err
    assert "dmusingu/lapvqa-coca-vit-l14" in err and err.count("\n") == 1, err
    assert not (tmp_path / "f").exists()


def test_cli_extracts_the_frontal_image_of_every_report(release, tmp_path, capsys):
    from lapvqa_hf.cli import main as lapvqa

    root, images = release
    config = LapvqaVisionConfig(
        image_size=224, patch_size=112, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    LapvqaVisionModel(config).save_pretrained(tmp_path / "encoder")
    stretch(224).save_pretrained(tmp_path / "encoder")
    args = ["extract-features", "--encoder", "lapvqa-vit-l14", "--checkpoint", str(tmp_path / "encoder")]
    assert lapvqa([*args, "--data-root", str(root), "--task", "captioning", "--output", str(tmp_path / "f")]) == 0
    reports = [row for split in load_mimic_cxr_reports(root).values() for row in split]
    assert set(FeatureStore(tmp_path / "f")._tensors) == set(images_of(reports, root=root.resolve()))
    assert len(reports) == len(images) == 10, "in the synthetic release, every study is in a pair and has a report"
    (tmp_path / "reports.csv").write_text(f"image,report\n{reports[0]['image']},No effusion.\n")
    assert lapvqa([*args, "--reports", str(tmp_path / "reports.csv"), "--output", str(tmp_path / "g")]) == 0
    assert list(FeatureStore(tmp_path / "g")._tensors) == [reports[0]["image"]], "absolute paths as ids"


@pytest.mark.parametrize("option", ["--data-root", "--mimic-root"])
@pytest.mark.parametrize(
    "command", [["extract-features", "--encoder", "coca", "--output", "f"], ["evaluate", "m", "--features", "x"]]
)
def test_the_data_folder_option_keeps_its_earlier_name_mimic_root(command, option):
    from lapvqa_hf.cli import build_parser

    assert build_parser().parse_args([*command, option, "release"]).data_root == Path("release")
