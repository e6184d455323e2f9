"""`lapvqa convert diffvqa`: strict, safe, verified, atomic."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import visual_features
from lapvqa_hf.convert import diffvqa
from lapvqa_hf.convert.original import DiffVQAHead, randomize_

from lapvqa_hf import LapvqaDiffVQAModel
from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.compatibility import TRANSFORMERS_NEWEST_TESTED, TRANSFORMERS_OLDEST_TESTED

SMALL_HEAD = dict(d_model=64, nhead=4, num_layers=3, dim_feedforward=80, max_len=60)


def write_head(path, vis_dim=768, seed=0, **overrides):
    head = randomize_(DiffVQAHead(vis_dim=vis_dim, **{**SMALL_HEAD, **overrides}), seed=seed)
    torch.save(head.state_dict(), path)
    return head.eval()


def run_cli(*args):
    return lapvqa(["convert", "diffvqa", *map(str, args)])


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "coca_best.pt"
    write_head(path, nhead=4)
    return path


def test_converts_verifies_and_writes_a_loadable_folder(checkpoint, tmp_path, capsys):
    out = tmp_path / "lapvqa-diffvqa-coca"
    assert run_cli(checkpoint, "--encoder", "coca", "--output", out, "--num-heads", "4") == 0
    printed = capsys.readouterr().out
    assert "vis_dim 768, 3 layers, FFN 80, 60 positions, final norm yes, lm_head untied" in printed
    assert "verify passed: float64 max |Δlogit| = " in printed and "greedy answers identical for 3/3 samples" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "config.json",
        "configuration_lapvqa_coca.py",
        "configuration_lapvqa_common.py",
        "configuration_lapvqa_diffvqa.py",
        "configuration_lapvqa_vision.py",
        "encoders.py",
        "generation_config.json",
        "greedy_decoding.py",
        "image_processing_lapvqa.py",
        "model.safetensors",
        "modeling_lapvqa_coca.py",
        "modeling_lapvqa_common.py",
        "modeling_lapvqa_diffvqa.py",
        "modeling_lapvqa_vision.py",
        "pipeline_lapvqa.py",
        "processing_lapvqa.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "xray_reading.py",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["encoder_name"] == "coca" and config["vis_dim"] == 768
    assert config["num_attention_heads"] == 4 and config["hidden_act"] == "relu"
    info = config["conversion_info"]
    assert info["source_file"] == "coca_best.pt" and len(info["source_sha256"]) == 64
    assert info["assumed_num_attention_heads"] == 4
    assert info["transformers_versions_tested"] == f">={TRANSFORMERS_OLDEST_TESTED},<={TRANSFORMERS_NEWEST_TESTED}"
    assert info["converted_with_transformers"] == transformers.__version__ == config["transformers_version"]
    # The card's 128 new tokens, capped by what the 60 learned positions allow.
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 59
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_converted_model_matches_the_original_to_1e_5(tmp_path):
    for final_norm, tied in ((True, False), (False, True)):
        source = tmp_path / f"head-{final_norm}-{tied}.pt"
        original = write_head(source, vis_dim=1152, final_norm=final_norm, tie_weights=tied, nhead=4)
        out = tmp_path / f"out-{final_norm}-{tied}"
        diffvqa.convert_diffvqa(source, "siglip", out, num_attention_heads=4, log=lambda _: None)
        model = LapvqaDiffVQAModel.from_pretrained(out, attn_implementation="eager").eval()
        assert model.config.use_final_layer_norm == final_norm and model.config.tie_word_embeddings == tied
        curr_vis, ref_vis = visual_features(2, 7, 3, 1152)
        ids = torch.randint(0, 50256, (2, 11))
        with torch.no_grad():
            diff = model(
                input_ids=ids, current_image_features=curr_vis, prior_image_features=ref_vis
            ).logits - original(curr_vis, ref_vis, ids)
        assert diff.abs().max() < 1e-5


@pytest.mark.slow
def test_real_size_checkpoint_converts_with_pinned_defaults(tmp_path):
    source = tmp_path / "clip-vit-l14_best.pt"
    torch.save(randomize_(DiffVQAHead(vis_dim=1024), seed=3, std=0.02).state_dict(), source)
    out = tmp_path / "out"
    assert run_cli(source, "--encoder", "clip-vit-l14", "--output", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"], config["max_position_embeddings"]) == (
        6,
        2048,
        200,
    )
    assert config["num_attention_heads"] == 8 and config["vis_dim"] == 1024
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 128


def test_module_entry_point(checkpoint, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lapvqa_hf.convert.diffvqa",
            str(checkpoint),
            "--encoder",
            "coca",
            "--output",
            str(out),
            "--num-heads",
            "4",
            "--no-verify",
        ],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert result.returncode == 0, result.stderr
    assert "verify" not in result.stdout
    assert (out / "model.safetensors").is_file()


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def _refused(tmp_path, capsys, source, *extra, encoder="coca"):
    out = tmp_path / "out"
    code = run_cli(source, "--encoder", encoder, "--output", out, "--num-heads", "4", *extra)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert not out.exists(), "a refused conversion must not write anything"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    # Progress bars may precede it, but the error itself is one line, the last one.
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and err.endswith(error_lines[0]), err
    return error_lines[0]


def test_malicious_pickle_is_refused_without_running_it(tmp_path, capsys):
    source = tmp_path / "evil.pt"
    torch.save({"vis_proj.weight": RunsCode()}, source)
    err = _refused(tmp_path, capsys, source)
    assert "refused to load a pickle that could run code (it imports posix.system)" in err
    assert "weights_only=False" not in err


def test_legacy_pickle_with_code_is_refused(tmp_path, capsys):
    source = tmp_path / "legacy.pt"
    with open(source, "wb") as file:
        pickle.dump({"vis_proj.weight": RunsCode()}, file, protocol=2)
    assert "could run code (it imports posix.system)" in _refused(tmp_path, capsys, source)


def test_truncated_checkpoint_is_refused(checkpoint, tmp_path, capsys):
    data = checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    assert "not a readable PyTorch checkpoint (truncated or corrupt" in _refused(tmp_path, capsys, truncated)


def test_garbage_file_is_refused(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint" * 20)
    assert "not a readable PyTorch checkpoint" in _refused(tmp_path, capsys, garbage)


def test_missing_file_is_refused(tmp_path, capsys):
    assert "no such file" in _refused(tmp_path, capsys, tmp_path / "absent.pt")


def test_non_dict_and_non_tensor_values_are_refused(tmp_path, capsys):
    source = tmp_path / "list.pt"
    torch.save([torch.ones(1)], source)
    assert "expected a state dict (dict of tensors), found list" in _refused(tmp_path, capsys, source)
    source = tmp_path / "mixed.pt"
    torch.save({"vis_proj.weight": torch.ones(2, 2), "epoch": 3}, source)
    assert "found other values under ['epoch']" in _refused(tmp_path, capsys, source)


def test_unknown_keys_are_named(checkpoint, tmp_path, capsys):
    state = torch.load(checkpoint, weights_only=True)
    state["decoder.layers.0.extra.weight"] = torch.ones(3)
    torch.save(state, checkpoint)
    err = _refused(tmp_path, capsys, checkpoint)
    assert "unknown keys in the checkpoint (not part of the expected layout): ['decoder.layers.0.extra.weight']" in err


def test_missing_keys_are_named(checkpoint, tmp_path, capsys):
    state = torch.load(checkpoint, weights_only=True)
    del state["decoder.layers.1.multihead_attn.in_proj_bias"]
    torch.save(state, checkpoint)
    assert "missing source tensor 'decoder.layers.1.multihead_attn.in_proj_bias'" in _refused(
        tmp_path, capsys, checkpoint
    )


def test_wrong_shapes_are_named(checkpoint, tmp_path, capsys):
    state = torch.load(checkpoint, weights_only=True)
    state["decoder.layers.2.linear2.weight"] = torch.zeros(64, 81)
    torch.save(state, checkpoint)
    err = _refused(tmp_path, capsys, checkpoint)
    assert "shape mismatch: decoder.layers.2.fc2.weight: expected [64, 80], found [64, 81]" in err


def test_encoder_with_another_width_is_refused(checkpoint, tmp_path, capsys):
    err = _refused(tmp_path, capsys, checkpoint, encoder="siglip")
    assert "encoder siglip gives 1152-dim features, but the checkpoint's vis_proj takes 768" in err


def test_unknown_encoder_is_refused_by_the_cli(checkpoint, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(checkpoint, "--encoder", "resnet50", "--output", tmp_path / "out")
    assert exit_info.value.code == 2


def test_heads_that_do_not_divide_the_width_are_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(checkpoint, "--encoder", "coca", "--output", out, "--num-heads", "7") == 1
    assert "--num-heads 7 does not divide the width 64" in capsys.readouterr().err


def test_failed_verification_writes_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    real_convert = diffvqa.convert_state_dict

    def corrupted(state_dict, config):
        converted = real_convert(state_dict, config)
        converted["decoder.layers.0.fc1.bias"] = converted["decoder.layers.0.fc1.bias"] + 0.5
        return converted

    monkeypatch.setattr(diffvqa.CONVERTER, "convert_state_dict", corrupted)
    err = _refused(tmp_path, capsys, checkpoint)
    assert "verify FAILED" in err and "nothing was written" in err


def test_existing_output_is_kept_unless_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(checkpoint, "--encoder", "coca", "--output", out, "--num-heads", "4") == 0
    first = (out / "model.safetensors").stat().st_mtime_ns
    assert run_cli(checkpoint, "--encoder", "coca", "--output", out, "--num-heads", "4") == 1
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == first
    assert run_cli(checkpoint, "--encoder", "coca", "--output", out, "--num-heads", "4", "--overwrite") == 0
    assert (out / "model.safetensors").stat().st_mtime_ns != first, "an earlier conversion is replaced whole"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_the_help_and_the_summary_read_as_whole_sentences(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lapvqa(["convert", "vqa", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Convert an upstream `VQAHead` state dict (`{encoder}_best.pt` of `dmusingu/lapvqa-vqa`) into a " \
           "Transformers model folder." in help_text  # fmt: skip
    source = tmp_path / "coca_best.pt"
    write_head(source, num_layers=1, nhead=4)
    assert run_cli(source, "--encoder", "coca", "--num-heads", "4", "--output", tmp_path / "out", "--no-verify") == 0
    assert "vis_dim 768, 1 layer, FFN 80" in capsys.readouterr().out


def test_a_native_head_records_its_fine_tuned_encoder_and_refuses_images_without_it(checkpoint, tmp_path, capsys):
    """`lapvqa-diffvqa-native` files hold the head alone: the off-the-shelf encoder would not reproduce it."""
    out = tmp_path / "native"
    assert run_cli(checkpoint, "--encoder", "coca", "--num-heads", "4", "--native", "--output", out) == 0
    printed = capsys.readouterr().out
    assert "note: the fine-tuned coca encoder is not in this file" in printed and "--encoder-checkpoint" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["encoder_finetuned"] is True
    with pytest.raises(ValueError, match="trained with its coca encoder fine-tuned") as error:
        transformers.pipeline("lapvqa-diffvqa", model=str(out), trust_remote_code=True)
    assert "\n" not in str(error.value) and "--encoder-checkpoint" in str(error.value)
    model = LapvqaDiffVQAModel.from_pretrained(out)  # from that encoder's features it runs as it is
    curr_vis, ref_vis = visual_features(1, 3, 3, 768)
    ids = torch.randint(0, 50256, (1, 4))
    assert model(input_ids=ids, current_image_features=curr_vis, prior_image_features=ref_vis).logits.isfinite().all()
