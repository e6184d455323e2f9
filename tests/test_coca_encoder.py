"""CoCa's image tower without open_clip: `LapvqaCocaVisionModel`, converted from open_clip's weights.

The `open_clip` tests compare against open_clip itself; `.ci/run` runs them in an environment that has it
(`.venv-open-clip`). Everything else compares against `lapvqa_hf.convert.original.CocaVisionTower`, open_clip's module
re-implemented with its state-dict layout, which the `open_clip` tests in turn check key for key.
"""

import json

import numpy as np
import pytest
import torch
from conftest import run_without_lapvqa_hf
from lapvqa_hf.convert.coca_encoder import convert_coca_state_dict, infer_coca_config
from lapvqa_hf.convert.original import CocaVisionTower, randomize_
from transformers import AutoImageProcessor, AutoModel, CLIPImageProcessor

from lapvqa_hf import LapvqaCocaVisionConfig, LapvqaCocaVisionModel
from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.models.encoders import CLIP_MEAN, CLIP_STD

# Few, large patches (4 x 4 at 224 px) and the recipe's token width (768), so a tiny tower can feed CoCa heads.
TINY_TOWER = dict(
    image_size=224, patch_size=56, width=64, layers=2, heads=4, output_dim=768, attn_pooler_queries=9,
    attn_pooler_heads=4,
)  # fmt: skip
TINY_HEADS = ["--num-heads", "4", "--pooler-num-heads", "4"]


def tiny_coca_tower(seed: int = 0) -> CocaVisionTower:
    return randomize_(CocaVisionTower(**TINY_TOWER), seed=seed).eval()


def open_clip_checkpoint(tower: CocaVisionTower) -> dict[str, torch.Tensor]:
    """What open_clip saves for a whole CoCa model: the image tower under `visual.`, and the text side."""
    text_side = {"text.token_embedding.weight": torch.zeros(10, 8), "text_decoder.ln_final.weight": torch.ones(8)}
    visual = {f"visual.{key}": tensor for key, tensor in tower.state_dict().items()}
    return {**visual, **text_side, "logit_scale": torch.tensor(4.6)}


def converted_tiny_coca(folder, seed: int = 0):
    """A tiny CoCa tower converted by `lapvqa convert coca-encoder` into `folder` (returns the folder)."""
    checkpoint = folder.parent / f"{folder.name}-open_clip.bin"
    torch.save(open_clip_checkpoint(tiny_coca_tower(seed)), checkpoint)
    assert lapvqa(["convert", "coca-encoder", str(checkpoint), *TINY_HEADS, "--output", str(folder)]) == 0
    return folder


def random_images(batch: int = 2, size: int = 224) -> torch.Tensor:
    return torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(1))


def test_the_converted_tower_gives_the_originals_tokens_and_embedding(tmp_path, capsys):
    tower = tiny_coca_tower()
    folder = converted_tiny_coca(tmp_path / "coca")
    out = capsys.readouterr().out
    assert "left out 3 text-side tensors" in out and "float64 max |Δfeature| = " in out and "wrote " in out
    model = AutoModel.from_pretrained(folder)
    assert isinstance(model, LapvqaCocaVisionModel)
    images = random_images()
    with torch.no_grad():
        embedding, tokens = tower(images)
        found = model(images)
    assert found.last_hidden_state.shape == (2, 8, 768), "the pooled queries after the first"
    torch.testing.assert_close(found.last_hidden_state, tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(found.image_embeds, embedding, atol=1e-5, rtol=0)


def test_the_folder_records_the_conversion_and_prepares_images_as_open_clip(tmp_path):
    folder = converted_tiny_coca(tmp_path / "coca")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "lapvqa_coca_vision"
    assert config["auto_map"]["AutoModel"] == "modeling_lapvqa_coca.LapvqaCocaVisionModel"
    info = config["conversion_info"]
    assert info["assumed_num_attention_heads"] == 4 and info["assumed_pooler_num_attention_heads"] == 4
    assert any("open_clip's eval transform" in line for line in info["assumptions"])
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(processor).__name__.startswith("CLIPImageProcessor"), "PIL or torchvision backend, as installed"
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_processor_type"] == "CLIPImageProcessor"
    assert processor.size == {"shortest_edge": 224} and processor.crop_size == {"height": 224, "width": 224}
    assert processor.do_center_crop and processor.resample == 3, "shortest side, bicubic, centre crop"
    assert list(processor.image_mean) == list(CLIP_MEAN) and list(processor.image_std) == list(CLIP_STD)


def test_the_tower_runs_without_the_package(tmp_path):
    folder = converted_tiny_coca(tmp_path / "coca")
    images = random_images()
    with torch.no_grad():
        expected = LapvqaCocaVisionModel.from_pretrained(folder)(images).last_hidden_state
    torch.save(images, tmp_path / "images.pt")
    code = """
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
assert "lapvqa_hf" not in sys.modules, "the folder's own code, not the package"
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2], weights_only=True)).last_hidden_state, sys.argv[3])
"""
    run_without_lapvqa_hf(code, [str(folder), str(tmp_path / "images.pt"), str(tmp_path / "tokens.pt")], tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "tokens.pt", weights_only=True), expected, atol=0, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_every_attention_implementation_gives_the_same_tokens(tmp_path, attn_implementation):
    tower = tiny_coca_tower()
    config = infer_coca_config(tower.state_dict(), num_attention_heads=4, pooler_num_attention_heads=4)
    model = LapvqaCocaVisionModel(config)
    model.load_state_dict(convert_coca_state_dict(tower.state_dict(), config))
    model.save_pretrained(tmp_path / "coca")
    model = LapvqaCocaVisionModel.from_pretrained(tmp_path / "coca", attn_implementation=attn_implementation).eval()
    images = random_images()
    with torch.no_grad():
        torch.testing.assert_close(model(images).last_hidden_state, tower(images)[1], atol=1e-5, rtol=0)


def test_the_trunks_hidden_states_and_attentions_are_returned_on_request(tmp_path):
    folder = converted_tiny_coca(tmp_path / "coca")
    model = LapvqaCocaVisionModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        outputs = model(random_images(1), output_hidden_states=True, output_attentions=True)
    assert len(outputs.hidden_states) == 3 and outputs.hidden_states[-1].shape == (1, 17, 64), "embeddings + 2"
    assert len(outputs.attentions) == 2 and outputs.attentions[0].shape == (1, 4, 17, 17)


def test_a_safetensors_checkpoint_of_the_tower_alone_converts(tmp_path):
    from safetensors.torch import save_file

    tower = tiny_coca_tower(seed=5)
    save_file(tower.state_dict(), tmp_path / "open_clip_model.safetensors")
    arguments = ["convert", "coca-encoder", str(tmp_path / "open_clip_model.safetensors"), *TINY_HEADS]
    assert lapvqa([*arguments, "--output", str(tmp_path / "coca")]) == 0
    with torch.no_grad():
        found = LapvqaCocaVisionModel.from_pretrained(tmp_path / "coca")(random_images()).image_embeds
        torch.testing.assert_close(found, tower(random_images())[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("damage", "extra", "message"),
    [
        (lambda sd: {**sd, "visual.extra_bias": torch.zeros(3)}, [], "unknown keys in the checkpoint (not part of"),
        (lambda sd: {**sd, "image_head.weight": torch.zeros(3)}, [], "not visual.*, text.*, text_decoder.*): ['image_head.weight']"),
        (lambda sd: {**sd, "visual.proj": torch.zeros(768, 512)}, [], "proj should be [768, 768] after a 768-wide pooler, found [768, 512]"),
        (lambda sd: {k: v for k, v in sd.items() if k != "visual.conv1.weight"}, [], "missing 'conv1.weight'"),
        (lambda sd: sd, ["--num-heads", "5"], "--num-heads 5 does not divide the width 64"),
        (lambda sd: sd, ["--pooler-num-heads", "7"], "--pooler-num-heads 7 does not divide the width 768"),
    ],
)  # fmt: skip
def test_checkpoints_that_are_not_a_coca_tower_are_refused_in_one_line(tmp_path, capsys, damage, extra, message):
    torch.save(damage(open_clip_checkpoint(tiny_coca_tower())), tmp_path / "bad.bin")
    arguments = ["convert", "coca-encoder", str(tmp_path / "bad.bin"), *TINY_HEADS, *extra]
    assert lapvqa([*arguments, "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_corrupt_safetensors_file_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    arguments = [
        "convert",
        "coca-encoder",
        str(tmp_path / "open_clip_model.safetensors"),
        "--output",
        str(tmp_path / "o"),
    ]
    assert lapvqa(arguments) == 1
    err = capsys.readouterr().err
    assert "not a readable safetensors file" in err and err.count("\n") == 1


def test_the_config_refuses_shapes_the_tower_cannot_have():
    with pytest.raises(
        Exception, match=r"pooler_num_attention_heads \(5\) must divide the width it attends over \(768\)"
    ):
        LapvqaCocaVisionConfig(pooler_num_attention_heads=5)
    with pytest.raises(Exception, match="num_pooler_queries must be at least 2"):
        LapvqaCocaVisionConfig(num_pooler_queries=1)


def test_wrong_pixel_values_say_what_the_tower_takes(tmp_path):
    model = LapvqaCocaVisionModel.from_pretrained(converted_tiny_coca(tmp_path / "coca"))
    with pytest.raises(ValueError, match=r"`pixel_values` must be \[batch, 3, height, width\], got \[2, 1, 224, 224\]"):
        model(torch.zeros(2, 1, 224, 224))
    with pytest.raises(ValueError, match=r"Input image size \(112\*112\) doesn't match model \(224\*224\)"):
        model(torch.zeros(1, 3, 112, 112))


# --- against open_clip itself (`.venv-open-clip` in CI) -------------------------------------------------------------


def open_clip_module():
    return pytest.importorskip("open_clip", reason="open_clip parity runs where open_clip_torch is installed")


@pytest.mark.open_clip
def test_the_original_re_implementation_has_open_clips_layout_and_outputs():
    open_clip = open_clip_module()
    torch.manual_seed(0)
    visual = open_clip.create_model("coca_ViT-L-14", pretrained=None).visual.eval()
    tower = CocaVisionTower().eval()
    tower.load_state_dict(visual.state_dict(), strict=True)
    images = random_images()
    with torch.no_grad():
        (expected_embedding, expected_tokens), (embedding, tokens) = visual(images), tower(images)
    assert expected_tokens.shape == (2, 255, 768), "open_clip's CoCa gives 255 tokens: 256 queries, the first pooled"
    torch.testing.assert_close(tokens, expected_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(embedding, expected_embedding, atol=1e-5, rtol=0)


def _convert_open_clip_coca(
    open_clip, model, tmp_path, *heads, tower_only: bool = False
) -> tuple[torch.nn.Module, LapvqaCocaVisionModel]:
    state_dict = model.state_dict()
    if tower_only:  # open_clip's `visual.*` keys alone: the ViT-L/14 text side would double the disk this test needs
        state_dict = {key: value for key, value in state_dict.items() if key.startswith("visual.")}
    torch.save(state_dict, tmp_path / "open_clip_pytorch_model.bin")
    arguments = ["convert", "coca-encoder", str(tmp_path / "open_clip_pytorch_model.bin"), *heads]
    assert lapvqa([*arguments, "--output", str(tmp_path / "coca")]) == 0
    (tmp_path / "open_clip_pytorch_model.bin").unlink()
    visual = model.visual.eval()
    visual.output_tokens = True
    return visual, LapvqaCocaVisionModel.from_pretrained(tmp_path / "coca").eval()


@pytest.mark.open_clip
def test_coca_vit_l14_converted_from_open_clip_matches_open_clip(tmp_path):
    open_clip = open_clip_module()
    torch.manual_seed(0)
    visual, model = _convert_open_clip_coca(
        open_clip, open_clip.create_model("coca_ViT-L-14", pretrained=None), tmp_path, tower_only=True
    )
    assert model.config.num_hidden_layers == 24 and model.config.hidden_size == 1024
    images = random_images()
    with torch.no_grad():
        (embedding, tokens), found = visual(images), model(images)
    assert found.last_hidden_state.shape == tokens.shape == (2, 255, 768)
    assert (found.last_hidden_state - tokens).abs().max().item() <= 1e-4
    assert (found.image_embeds - embedding).abs().max().item() <= 1e-4


@pytest.mark.open_clip
def test_a_tiny_open_clip_coca_converts_and_matches(tmp_path):
    open_clip = open_clip_module()
    torch.manual_seed(0)
    model = open_clip.CoCa(
        embed_dim=48,
        vision_cfg=dict(image_size=56, patch_size=14, width=64, layers=2, head_width=16, attentional_pool=True,
                        attn_pooler_queries=7, attn_pooler_heads=6, output_tokens=True),
        text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1, embed_cls=True, output_tokens=True),
        multimodal_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1),
    )  # fmt: skip
    visual, converted = _convert_open_clip_coca(
        open_clip, model, tmp_path, "--num-heads", "4", "--pooler-num-heads", "6"
    )
    assert (converted.config.num_pooler_queries, converted.config.projection_dim) == (7, 48)
    images = random_images(size=56)
    with torch.no_grad():
        (embedding, tokens), found = visual(images), converted(images)
    assert (found.last_hidden_state - tokens).abs().max().item() <= 1e-4
    assert (found.image_embeds - embedding).abs().max().item() <= 1e-4


@pytest.mark.open_clip
def test_the_saved_image_processor_prepares_images_as_open_clips_transform(tmp_path):
    from PIL import Image

    open_clip = open_clip_module()
    _, _, open_clip_transform = open_clip.create_model_and_transforms("coca_ViT-L-14", pretrained=None)
    processor = CLIPImageProcessor.from_pretrained(converted_tiny_coca(tmp_path / "coca"))
    for size in [(300, 240), (224, 224), (97, 131)]:
        pixels = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels, mode="RGB")
        expected = open_clip_transform(image)
        found = processor(images=[image], return_tensors="pt")["pixel_values"][0]
        assert found.shape == expected.shape == (3, 224, 224)
        # Both resize with PIL's bicubic filter; transformers rounds the resized image to 8 bits on the way, so
        # a pixel may differ by one 8-bit level (measured: 0.0150 at most).
        assert (found - expected).abs().max().item() <= 1.001 / 255 / min(CLIP_STD), size


def test_the_left_out_text_side_may_hold_anything_but_the_tower_must_be_finite(tmp_path, capsys):
    checkpoint = open_clip_checkpoint(tiny_coca_tower())
    checkpoint["text_decoder.ln_final.weight"] = torch.full((8,), float("nan"))  # open_clip leaves some uninitialised
    torch.save(checkpoint, tmp_path / "text-nan.bin")
    assert (
        lapvqa(
            ["convert", "coca-encoder", str(tmp_path / "text-nan.bin"), *TINY_HEADS, "--output", str(tmp_path / "a")]
        )
        == 0
    )
    checkpoint["visual.proj"] = torch.full((768, 768), float("nan"))
    torch.save(checkpoint, tmp_path / "tower-nan.bin")
    assert (
        lapvqa(
            ["convert", "coca-encoder", str(tmp_path / "tower-nan.bin"), *TINY_HEADS, "--output", str(tmp_path / "b")]
        )
        == 1
    )
    assert "non-finite values (NaN or inf) in ['visual.proj']" in capsys.readouterr().err
