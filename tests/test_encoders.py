"""One registry of frozen encoders, and converted heads that name the encoder feeding them."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from lapvqa_hf.convert.original import DetectionHead, DiffVQAHead, VQAHead, randomize_
from transformers import CLIPVisionConfig, CLIPVisionModel, ViTMAEConfig, ViTMAEModel

from lapvqa_hf import LapvqaDiffVQAModel
from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.collection import load_collection
from lapvqa_hf.features import load_encoder, patch_tokens
from lapvqa_hf.models.encoders import ENCODER_WIDTHS, RECIPES, EncoderRecipe

TINY_HEAD = dict(d_model=32, nhead=4, num_layers=1, dim_feedforward=48, max_len=40)


def test_every_collection_entry_takes_its_encoders_width():
    for entry in load_collection().models:
        assert entry.vis_dim == RECIPES[entry.encoder].vis_dim


def test_a_recipe_read_back_from_json_equals_the_registry_entry():
    for recipe in RECIPES.values():
        assert EncoderRecipe(**json.loads(json.dumps(dataclasses.asdict(recipe)))) == recipe


@pytest.mark.parametrize(
    ("kind", "head", "filename"),
    [
        ("diffvqa", lambda: DiffVQAHead(vis_dim=1024, **TINY_HEAD), "clip-vit-l14_best.pt"),
        ("vqa", lambda: VQAHead(vis_dim=1024, **{**TINY_HEAD, "max_len": 30}), "clip-vit-l14_best.pt"),
        ("detection", lambda: DetectionHead(vis_dim=1024, d_model=32, dim_feedforward=48), "plain.pt"),
    ],
)
def test_converted_heads_record_their_encoder_with_the_recipes_hub_id_by_default(tmp_path, kind, head, filename):
    torch.save(randomize_(head()).state_dict(), tmp_path / filename)
    heads = ["--num-heads", "4"] if kind != "detection" else []
    assert lapvqa(["convert", kind, str(tmp_path / filename), "--encoder", "clip-vit-l14", *heads,
                   "--output", str(tmp_path / "out")]) == 0  # fmt: skip
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["feature_recipe"] == dataclasses.asdict(RECIPES["clip-vit-l14"])
    assert config["feature_recipe"]["checkpoint"] == "openai/clip-vit-large-patch14"
    assert config["feature_recipe"]["revision"] is None


def tiny_clip(folder, hidden_size=1024):
    """A random CLIP vision tower of the recipe's width (1024), 28 px, 2 x 2 patches."""
    config = CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
        patch_size=14,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPVisionModel(config).save_pretrained(folder)
    return folder


def test_a_head_converted_with_a_local_encoder_checkpoint_loads_that_encoder_and_takes_its_tokens(tmp_path):
    torch.save(randomize_(DiffVQAHead(vis_dim=1024, **TINY_HEAD)).state_dict(), tmp_path / "head.pt")
    encoder_folder = tiny_clip(tmp_path / "tiny-clip")
    arguments = ["--encoder", "clip-vit-l14", "--encoder-checkpoint", str(encoder_folder), "--encoder-revision", "v2"]
    assert lapvqa(["convert", "diffvqa", str(tmp_path / "head.pt"), *arguments, "--num-heads", "4",
                   "--output", str(tmp_path / "out")]) == 0  # fmt: skip
    head = LapvqaDiffVQAModel.from_pretrained(tmp_path / "out")
    recipe = EncoderRecipe(**head.config.feature_recipe)
    assert recipe.checkpoint == str(encoder_folder.resolve()) and recipe.revision == "v2"
    encoder = load_encoder(dataclasses.replace(recipe, revision=None))  # a local folder has no revisions
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = patch_tokens(recipe, encoder, pixels)
        expected = encoder(pixel_values=pixels).last_hidden_state[:, 1:]  # CLIP: CLS dropped
    assert torch.equal(tokens, expected) and tokens.shape == (2, 4, ENCODER_WIDTHS["clip-vit-l14"])
    question = torch.tensor([[11, 12, 50256]])
    answer = head.generate(
        input_ids=question, current_image_features=tokens[:1], prior_image_features=tokens[1:], max_new_tokens=3
    )
    assert answer.shape[1] > question.shape[1]


def test_the_mae_encoder_sees_every_patch(tmp_path):
    config = ViTMAEConfig(
        hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
        patch_size=16, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_intermediate_size=32,
    )  # fmt: skip
    ViTMAEModel(config).save_pretrained(tmp_path / "mae")
    recipe = dataclasses.replace(RECIPES["mae-vit-l16"], checkpoint=str(tmp_path / "mae"))
    encoder = load_encoder(recipe)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        first, second = (patch_tokens(recipe, encoder, pixels) for _ in range(2))
    assert first.shape == (1, 4, 1024) and torch.equal(first, second), "no random masking or shuffling"


def test_an_8_bit_rgb_image_gets_exactly_the_encoders_own_pixel_values():
    from PIL import Image
    from transformers import CLIPImageProcessor

    from lapvqa_hf import LapvqaImageProcessor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (61, 47, 3), dtype=np.uint8), mode="RGB")
    clip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    expected = clip(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.equal(LapvqaImageProcessor().encoder_pixel_values(image, clip), expected)
    gray = np.asarray(image.convert("L"))  # a grayscale X-ray reaches the encoder as its RGB replica
    replica = clip(images=[Image.fromarray(np.stack([gray] * 3, axis=-1))], return_tensors="pt")["pixel_values"]
    assert torch.equal(LapvqaImageProcessor().encoder_pixel_values(gray, clip), replica)
