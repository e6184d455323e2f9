"""Converters under faults and hostile input: `--overwrite` replaces only an earlier conversion, a killed run
leaves nothing behind for good, damaged weights never convert, and outputs get the user's umask permissions."""

import os
import stat
import subprocess
import sys
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lapvqa_hf.convert.checkpoint import ConversionError, load_untrusted_state_dict
from test_convert_diffvqa import run_cli, write_head

from lapvqa_hf.files import atomic_output_dir

ARGS = ("--encoder", "coca", "--num-heads", "4")


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "coca_best.pt"
    write_head(path, nhead=4)
    return path


def error_of(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_overwrite_never_empties_a_folder_a_conversion_did_not_write(checkpoint, tmp_path, capsys):
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    assert run_cli(checkpoint, *ARGS, "--output", mine, "--overwrite") == 1
    assert "is not the output of an earlier `lapvqa convert`" in error_of(capsys)
    assert (mine / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("where", ["the current folder", "the folder holding the input", "the input file"])
def test_overwrite_never_replaces_the_input_checkpoint(checkpoint, tmp_path, capsys, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    output = {
        "the current folder": ".",
        "the folder holding the input": str(tmp_path),
        "the input file": str(checkpoint),
    }[where]
    before = checkpoint.read_bytes()
    assert run_cli(checkpoint.name, *ARGS, "--output", output, "--overwrite") == 1
    assert "would replace the input" in error_of(capsys)
    assert checkpoint.read_bytes() == before


def test_overwrite_never_replaces_a_conversion_that_holds_the_input(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(checkpoint, *ARGS, "--output", out) == 0
    inside = out / "coca_best.pt"
    inside.write_bytes(checkpoint.read_bytes())
    assert run_cli(inside, *ARGS, "--output", out, "--overwrite") == 1
    assert "would replace the input" in error_of(capsys) and inside.is_file()


def test_a_killed_conversion_leaves_a_staging_folder_that_the_next_run_removes(checkpoint, tmp_path):
    out = tmp_path / "out"
    code = f"""
import os, signal
from lapvqa_hf.files import atomic_output_dir
with atomic_output_dir({str(out)!r}) as staging:
    (staging / "model.safetensors").write_bytes(b"0" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    (abandoned,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-pid")]
    assert not out.exists()
    assert run_cli(checkpoint, *ARGS, "--output", out) == 0
    assert not abandoned.exists() and out.is_dir()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_live_conversions_staging_folder_is_left_alone(tmp_path):
    with atomic_output_dir(tmp_path / "out") as first:
        with atomic_output_dir(tmp_path / "out") as second:  # another conversion of the same process, still running
            assert first.is_dir() and second != first
        assert first.is_dir()


def test_outputs_get_the_users_umask_permissions(checkpoint, tmp_path):
    previous = os.umask(0o022)
    try:
        assert run_cli(checkpoint, *ARGS, "--output", tmp_path / "out") == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    for path in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def poisoned(checkpoint, tmp_path, change) -> str:
    state_dict = torch.load(checkpoint, weights_only=True)
    change(state_dict)
    path = tmp_path / "poisoned.pt"
    torch.save(state_dict, path)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda sd: sd["tok_emb.weight"][50000].fill_(float("nan")), "non-finite values (NaN or inf) in ['tok_emb.weight']"),
        (lambda sd: sd["pos_emb.weight"][-1].fill_(float("inf")), "non-finite values (NaN or inf) in ['pos_emb.weight']"),
        (lambda sd: sd.update({"vis_proj.bias": sd["vis_proj.bias"].to(torch.int8)}), "expected floating-point weights, found vis_proj.bias (torch.int8)"),
        (lambda sd: sd.update({"frame_emb.weight": sd["frame_emb.weight"] > 0}), "found frame_emb.weight (torch.bool)"),
        (lambda sd: sd.update({"lm_head.weight": sd["lm_head.weight"].to(torch.complex64)}), "found lm_head.weight (torch.complex64)"),
    ],
)  # fmt: skip
def test_poisoned_weights_never_convert(checkpoint, tmp_path, capsys, change, message):
    assert run_cli(poisoned(checkpoint, tmp_path, change), *ARGS, "--output", tmp_path / "out") == 1
    assert message in error_of(capsys) and not (tmp_path / "out").exists()


def test_a_flipped_byte_in_the_tensor_data_is_caught_by_its_checksum(checkpoint, tmp_path, capsys):
    data = bytearray(checkpoint.read_bytes())
    record = max(zipfile.ZipFile(checkpoint).infolist(), key=lambda info: info.file_size)  # the largest tensor
    offset = record.header_offset + 30 + len(record.filename) + len(record.extra) + record.file_size // 2
    data[offset] ^= 0x01
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    assert run_cli(damaged, *ARGS, "--output", tmp_path / "out") == 1
    assert f"corrupted tensor data (checksum mismatch in {record.filename})" in error_of(capsys)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=4000), noise=st.binary(max_size=64), at=st.integers(0, 10**7))
def test_any_damage_to_a_checkpoint_is_a_one_line_conversion_error(tmp_path_factory, cut, noise, at):
    folder = tmp_path_factory.mktemp("fuzz")
    torch.save({"w": torch.ones(8, 8), "b": torch.zeros(8)}, folder / "ok.pt")
    data = bytearray((folder / "ok.pt").read_bytes())
    position = at % len(data)
    data[position : position + len(noise)] = noise
    damaged = folder / "damaged.pt"
    damaged.write_bytes(bytes(data[: len(data) - cut]))
    try:
        loaded = load_untrusted_state_dict(damaged)
    except ConversionError as error:
        assert "\n" not in str(error) and str(error).startswith(str(damaged))
    else:
        assert set(loaded) == {"w", "b"} and all(torch.isfinite(t).all() for t in loaded.values())


def _resized(state_dict: dict, prefix: str, rows: int | None = None, width: int | None = None) -> None:
    """Every tensor under `prefix` cut to `rows` rows (dim 0) and/or `width` (the last dim)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        tensor = state_dict[key]
        if rows is not None:
            tensor = tensor[:rows]
        if width is not None:
            tensor = tensor[..., :width]
        state_dict[key] = tensor.clone()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda sd: sd.update({0: torch.zeros(3)}), "expected tensor names (text) as the state dict's keys, found 0 (int)"),
        (lambda sd: sd.update({"pos_emb.weight": torch.zeros(1, 64).expand(10**9, 64)}),
         "pos_emb.weight claims shape [1000000000, 64] but holds 64 values"),
        (lambda sd: _resized(sd, "pos_emb.", rows=0), "pos_emb.weight has 0 rows: the prompt needs at least 2 positions"),
        (lambda sd: _resized(sd, "pos_emb.", rows=1), "pos_emb.weight has 1 rows: the prompt needs at least 2 positions"),
        (lambda sd: _resized(sd, "tok_emb.", rows=50000), "tok_emb.weight has 50000 rows, but the GPT-2 vocabulary's <|endoftext|> (bos, eos, pad) is id 50256"),
        (lambda sd: [_resized(sd, k, width=0) for k in ("tok_emb.", "pos_emb.")], "'tok_emb.weight' is [50257, 0]: every dimension must be at least 1"),
    ],
    ids=["non-string-key", "claimed-shape", "no-positions", "one-position", "small-vocabulary", "zero-width"],
)  # fmt: skip
def test_hostile_checkpoints_are_refused_in_one_line(checkpoint, tmp_path, capsys, change, message):
    assert run_cli(poisoned(checkpoint, tmp_path, change), *ARGS, "--output", tmp_path / "out") == 1
    assert message in error_of(capsys) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"val_map40": float("nan")}, "val_map40 must be a number in [0, 1], found nan"),
        ({"val_map50": 3.0}, "val_map50 must be a number in [0, 1], found 3.0"),
        ({"epoch": -1}, "epoch must be a whole number of at least 0, found -1"),
        (
            {"encoder": "coca](http://evil) **bold**"},
            "the checkpoint names an unknown encoder 'coca](http://evil) **bold**'",
        ),
    ],
    ids=["nan-map", "map-above-one", "negative-epoch", "markdown-encoder"],
)
def test_detection_metadata_is_checked_before_it_reaches_config_and_card(tmp_path, capsys, metadata, message):
    from conftest import upstream_detection_checkpoint
    from test_detection import make_head

    checkpoint = {**upstream_detection_checkpoint(make_head(768), "coca"), **metadata}
    torch.save(checkpoint, tmp_path / "coca.pt")
    assert run_cli_detection(tmp_path / "coca.pt", "--num-heads", "4", "--output", tmp_path / "out") == 1
    assert message in error_of(capsys) and not (tmp_path / "out").exists()


def run_cli_detection(*args) -> int:
    from lapvqa_hf.cli import main as lapvqa

    return lapvqa(["convert", "detection", *map(str, args)])


def test_an_encoder_checkpoint_that_is_no_folder_is_refused_at_conversion(checkpoint, tmp_path, capsys):
    typo = tmp_path / "clip-vit-l41"
    assert run_cli(checkpoint, *ARGS, "--encoder-checkpoint", typo, "--output", tmp_path / "out") == 1
    assert f"--encoder-checkpoint {typo}: no such folder" in error_of(capsys)
    assert run_cli(checkpoint, *ARGS, "--encoder-checkpoint", "./clip-vit-l41", "--output", tmp_path / "out") == 1
    assert "--encoder-checkpoint ./clip-vit-l41: no such folder" in error_of(capsys)
