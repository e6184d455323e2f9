"""`lapvqa answer` against a hostile user: nothing the user owns is lost, no run mixes with another, no row stops the
run, every input column reaches the output unchanged, no folder's code runs unasked, and every failure is one line.

The CLI cases run the real `lapvqa` command in a subprocess where the point is what a user's terminal shows (one
line, no traceback); the rest call it in-process for speed."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lapvqa_hf.convert.original import DiffVQAHead, VQAHead
from PIL import Image
from test_pipelines import TINY_HEAD, convert, tiny_clip_folder
from transformers import pipeline

from lapvqa_hf.answer import Answerer, AnswerError, answer_dataset, read_input

QUIET = dict(progress=False)


def lines(path) -> list[dict]:
    """The JSON lines of a file (split on newlines only: JSON text may hold U+2028, which `splitlines` splits on)."""
    return [json.loads(line) for line in Path(path).read_bytes().split(b"\n") if line]


def run_lapvqa(*args, cwd=None) -> subprocess.CompletedProcess:
    """The real command in a fresh Python, as a user's terminal runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "lapvqa_hf.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def said(result: subprocess.CompletedProcess) -> list[str]:
    """What the command printed to stderr, less transformers' weight-loading progress bars."""
    return [line for line in result.stderr.splitlines() if line.strip() and "Loading weights" not in line]


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    errors = said(result)
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    generator = np.random.default_rng(3)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(generator.integers(0, 255, (40, 36), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return tiny_clip_folder(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def vqa_folder(tmp_path_factory, encoder) -> str:
    """A VQA head with 40 learned positions: questions of over 39 tokens leave no room, 30 leave little."""
    head = VQAHead(vis_dim=1024, **TINY_HEAD)
    return convert("vqa", head, tmp_path_factory.mktemp("vqa"), encoder, "--num-heads", "4")


@pytest.fixture(scope="module")
def diffvqa_folder(tmp_path_factory, encoder) -> str:
    head = DiffVQAHead(vis_dim=1024, **TINY_HEAD)
    return convert("diffvqa", head, tmp_path_factory.mktemp("diffvqa"), encoder, "--num-heads", "4")


def write_csv(path: Path, rows: list[dict], encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def vqa_rows(*questions: str) -> list[dict]:
    return [{"image": "abc"[i % 3] + ".png", "question": question} for i, question in enumerate(questions)]


def answer(model, input_path, output, images, **options):
    options = {"generate_kwargs": {"max_new_tokens": 4}, **options}
    return answer_dataset(model, input_path, output, image_root=images, **options, **QUIET)


# --- data loss ----------------------------------------------------------------------------------------------------


def test_save_maps_never_writes_into_a_folder_of_the_users(vqa_folder, images, tmp_path):
    rows = write_csv(tmp_path / "rows.csv", vqa_rows("why?", "where?"))
    before = {path.name: path.read_bytes() for path in images.iterdir()}
    with pytest.raises(AnswerError, match="already holds files that lapvqa answer did not write"):
        answer(vqa_folder, rows, tmp_path / "out.jsonl", images, save_maps=images)
    assert {path.name: path.read_bytes() for path in images.iterdir()} == before, "the images are untouched"
    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "0000001.png").write_bytes(b"the user's own picture")
    with pytest.raises(AnswerError, match=r"did not write \(e\.g\. 0000001\.png\)"):
        answer(vqa_folder, rows, tmp_path / "out.jsonl", images, save_maps=user_folder)
    assert (user_folder / "0000001.png").read_bytes() == b"the user's own picture"
    assert not (tmp_path / "out.jsonl").exists()


def test_save_maps_reuses_only_its_own_folder(vqa_folder, images, tmp_path):
    rows = write_csv(tmp_path / "rows.csv", vqa_rows("why?", "where?"))
    answer(vqa_folder, rows, tmp_path / "out.jsonl", images, save_maps=tmp_path / "maps")
    answer(vqa_folder, rows, tmp_path / "out.jsonl", images, save_maps=tmp_path / "maps", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "maps").glob("*.png")) == ["0000000.png", "0000001.png"]
    with pytest.raises(AnswerError, match="holds the pictures of another output"):
        answer(vqa_folder, rows, tmp_path / "other.jsonl", images, save_maps=tmp_path / "maps")


def test_the_output_is_never_the_input_and_never_a_file_lapvqa_did_not_write(vqa_folder, images, tmp_path):
    rows = write_csv(tmp_path / "rows.csv", vqa_rows("why?"))
    original = rows.read_bytes()
    result = run_lapvqa("answer", vqa_folder, "--input", rows, "--output", rows, "--overwrite", "--image-root", images)
    assert_one_line_error(result, "is the input file")
    assert rows.read_bytes() == original
    (tmp_path / "notes.jsonl").write_text("my notes\n")
    result = run_lapvqa("answer", vqa_folder, "--input", rows, "--output", tmp_path / "notes.jsonl", "--overwrite",
                        "--image-root", images)  # fmt: skip
    assert_one_line_error(result, "was not written by `lapvqa answer`; it is never replaced")
    assert (tmp_path / "notes.jsonl").read_text() == "my notes\n"


# --- silent mixing ------------------------------------------------------------------------------------------------


def test_an_output_of_another_input_is_not_complete_already(vqa_folder, images, tmp_path):
    first = write_csv(tmp_path / "first.csv", vqa_rows("why?"))
    second = write_csv(tmp_path / "second.csv", vqa_rows("where?", "why?"))
    answer(vqa_folder, first, tmp_path / "out.jsonl", images)
    with pytest.raises(AnswerError, match=r"holds the answers of another run \(input_sha256 differ\)"):
        answer(vqa_folder, second, tmp_path / "out.jsonl", images)
    answer(vqa_folder, second, tmp_path / "out.jsonl", images, overwrite=True)
    assert [line["input"]["question"] for line in lines(tmp_path / "out.jsonl")] == ["where?", "why?"]


def _killed_after_one_batch(model, input_path, output, images, **options) -> None:
    answerer = Answerer(model, generate_kwargs={"max_new_tokens": 4}, **options)
    real, calls = answerer.answer, []

    def dies_at_the_second_batch(batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(batch)

    answerer.answer = dies_at_the_second_batch
    with pytest.raises(KeyboardInterrupt):
        answer_dataset(model, input_path, output, image_root=images, batch_size=1, answerer=answerer, **QUIET)


def test_parts_of_another_model_at_the_same_path_or_another_dtype_are_refused(vqa_folder, images, tmp_path):
    from safetensors.torch import load_file, save_file

    rows = write_csv(tmp_path / "rows.csv", vqa_rows("why?", "where?", "what?"))
    model = tmp_path / "model"
    shutil.copytree(vqa_folder, model)
    _killed_after_one_batch(str(model), rows, tmp_path / "out.jsonl", images)
    with pytest.raises(AnswerError, match=r"holds rows of another run \(dtype, model differ\)"):
        answer(str(model), rows, tmp_path / "out.jsonl", images, dtype=torch.bfloat16)
    weights = load_file(model / "model.safetensors")  # another model converted into the same folder
    weights["visual_projection.bias"] += 1
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AnswerError, match=r"holds rows of another run \(model differ\)"):
        answer(str(model), rows, tmp_path / "out.jsonl", images)


def test_the_same_model_by_another_path_and_defaults_spelled_out_still_resume(
    vqa_folder, images, tmp_path, monkeypatch
):
    rows = write_csv(tmp_path / "rows.csv", vqa_rows("why?", "where?", "what?"))
    complete = lines(answer(vqa_folder, rows, tmp_path / "full.jsonl", images))
    monkeypatch.chdir(Path(vqa_folder).parent)
    relative = os.path.relpath(vqa_folder)
    _killed_after_one_batch(relative, rows, tmp_path / "out.jsonl", images)
    default = json.loads((Path(vqa_folder) / "generation_config.json").read_text())
    assert not default.get("do_sample") and default.get("num_beams", 1) == 1
    spelled_out = {"max_new_tokens": 4, "do_sample": False, "num_beams": 1}
    answer(str(Path(vqa_folder).resolve()), rows, tmp_path / "out.jsonl", images, generate_kwargs=spelled_out)
    assert lines(tmp_path / "out.jsonl") == complete


# --- runs that can never finish -----------------------------------------------------------------------------------


def test_a_question_too_long_for_the_positions_is_that_rows_error(vqa_folder, images, tmp_path):
    too_long = " ".join(["the"] * 60)  # 60 tokens
    rows = write_csv(tmp_path / "rows.csv", vqa_rows("why?", too_long, "where?"))
    found = lines(answer(vqa_folder, rows, tmp_path / "out.jsonl", images, batch_size=3))
    assert "answer" in found[0] and "answer" in found[2]
    assert found[1]["error"].startswith("The question has 60 tokens; this model's 40 learned positions hold at most 39")
    assert found[1]["input"]["question"] == too_long
    answer(vqa_folder, rows, tmp_path / "out.jsonl", images)  # a re-run finds it complete


def test_a_long_question_gets_the_room_left_by_default_and_says_so(vqa_folder, images, tmp_path, capsys):
    """40 positions and the model's default max_new_tokens (39): a 30-token question leaves room for 11."""
    long_question = " ".join(["the"] * 30)  # 30 tokens
    rows = write_csv(tmp_path / "rows.csv", vqa_rows(long_question, "why?"))
    found = lines(answer_dataset(vqa_folder, rows, tmp_path / "out.jsonl", image_root=images, **QUIET))
    assert all("answer" in line for line in found)
    assert "rows had questions too long for the requested answer length" in capsys.readouterr().err
    pipe = pipeline(model=vqa_folder, trust_remote_code=True)
    alone = pipe({"image": str(images / "a.png"), "question": long_question})
    assert alone["answer"] == found[0]["answer"], "the pipeline caps it the same way"


def test_an_input_column_named_row_neither_replaces_the_index_nor_stops_resuming(vqa_folder, images, tmp_path):
    rows = write_csv(tmp_path / "rows.csv", [{"row": "7", **row} for row in vqa_rows("why?", "where?")])
    found = lines(answer(vqa_folder, rows, tmp_path / "out.jsonl", images))
    assert [line["row"] for line in found] == [0, 1] and [line["input"]["row"] for line in found] == ["7", "7"]
    answer(vqa_folder, rows, tmp_path / "out.jsonl", images)  # complete already, not appended again
    assert len(lines(tmp_path / "out.jsonl")) == 2


# --- output that hides or rewrites input --------------------------------------------------------------------------


def test_every_input_column_reaches_the_output_unchanged_beside_the_models_fields(vqa_folder, images, tmp_path, capsys):
    rows = [
        {"image": "a.png", "question": "why?", "answer": "ground truth", "error": "", "map": "x", "row": 9},
        {"image": "missing.png", "question": "where?", "answer": "left", "error": "none", "map": None, "row": 0},
        {"image": "b.png", "question": "what?", "answer": "right", "boxes": [1, 2], "report": {"a": 1}, "row": -3},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    found = lines(answer(vqa_folder, path, tmp_path / "out.jsonl", images))
    assert [line["row"] for line in found] == [0, 1, 2], "input order, whatever the rows' own `row` say"
    assert [line["input"] for line in found] == rows
    assert "error" not in found[0] and "error" not in found[2] and found[1]["error"].startswith("image: ")
    assert "3 rows (1 process), 1 skipped with an error" in capsys.readouterr().out


# --- code the user did not ask to run -----------------------------------------------------------------------------

PLANTED_PIPELINE = """
from pathlib import Path
from transformers import Pipeline

Path({marker!r}).write_text("the folder's code ran")


class Planted(Pipeline):
    def _sanitize_parameters(self, **kwargs):
        return {}, {}, {}
"""


def test_a_folders_own_pipeline_code_runs_only_with_trust_remote_code(vqa_folder, images, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(vqa_folder, model)
    config = json.loads((model / "config.json").read_text())
    config["custom_pipelines"] = {"lapvqa-vqa": {"impl": "planted.Planted", "pt": ["AutoModel"]}}
    (model / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "PLANTED"
    (model / "planted.py").write_text(PLANTED_PIPELINE.replace("{marker!r}", repr(str(marker))))
    rows = write_csv(tmp_path / "rows.csv", vqa_rows("why?"))
    arguments = ["--input", rows, "--image-root", images, "--max-new-tokens", "3"]
    result = run_lapvqa("answer", model, *arguments, "--output", tmp_path / "out.jsonl")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists(), "the folder's pipeline code did not run"
    assert "answer" in lines(tmp_path / "out.jsonl")[0]
    run_lapvqa("answer", model, *arguments, "--output", tmp_path / "trusted.jsonl", "--trust-remote-code")
    assert marker.exists(), "asked for, it runs"


def test_a_model_type_the_package_does_not_know_needs_trust_remote_code(tmp_path, images):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "planted_model", "auto_map": {
        "AutoConfig": "planted.PlantedConfig"}}))  # fmt: skip
    rows = write_csv(tmp_path / "rows.csv", vqa_rows("why?"))
    result = run_lapvqa("answer", model, "--input", rows, "--output", tmp_path / "out.jsonl", "--image-root", images)
    assert_one_line_error(result, f"{model}: the model could not be loaded")
    assert not (tmp_path / "out.jsonl").exists()


# --- one line instead of a traceback ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"image,question\na.png,caf\xe9?\n", "not UTF-8 text (byte 0xe9 at offset 24); save it as UTF-8"),
        (b"", "no rows"),
        (b"image,question\n", "no rows"),
        (b"picture,question\na.png,why?\n", "the header has ['picture', 'question'] (['image'] missing)"),
    ],
    ids=["latin-1", "empty", "header-only", "wrong-header"],
)
def test_unreadable_inputs_are_refused_in_one_line(vqa_folder, images, tmp_path, content, fragment):
    (tmp_path / "rows.csv").write_bytes(content)
    result = run_lapvqa("answer", vqa_folder, "--input", tmp_path / "rows.csv", "--output", tmp_path / "out.jsonl",
                        "--image-root", images)  # fmt: skip
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"], ids=["excel-bom", "utf-16"])
def test_utf8_with_a_bom_and_utf16_inputs_are_read(vqa_folder, images, tmp_path, encoding):
    rows = write_csv(tmp_path / "rows.csv", vqa_rows("pourquoi l'épanchement ?", "why?"), encoding=encoding)
    found = lines(answer(vqa_folder, rows, tmp_path / "out.jsonl", images))
    assert found[0]["input"] == {"image": "a.png", "question": "pourquoi l'épanchement ?"} and "answer" in found[0]


def test_a_huge_field_and_a_lone_surrogate_are_their_rows_errors(vqa_folder, images, tmp_path):
    (tmp_path / "rows.csv").write_text(f"image,question\na.png,{'x' * 200_000}\nb.png,why?\n")
    found = lines(answer(vqa_folder, tmp_path / "rows.csv", tmp_path / "a.jsonl", images))
    assert found[0]["error"].startswith("The question has") and "answer" in found[1]
    (tmp_path / "rows.jsonl").write_text('{"image": "a.png", "question": "why \\ud800?"}\n{"image": "b.png", '
                                         '"question": "why?"}\n{"image": 3}\n[1, 2]\n{not json\n')  # fmt: skip
    found = lines(answer(vqa_folder, tmp_path / "rows.jsonl", tmp_path / "b.jsonl", images))
    assert found[0]["error"] == "question: not valid Unicode text (a lone surrogate)"
    assert found[0]["input"]["question"] == "why \ud800?", "kept as it was read (escaped in the JSON)"
    assert "answer" in found[1]
    assert found[2]["error"] == "image: expected text, found int 3; question: missing or empty"
    assert found[3]["error"].startswith("expected a JSON object") and found[3]["input"] == [1, 2]
    assert found[4]["error"].startswith("line 5: not JSON") and found[4]["input"] == "{not json"


@pytest.mark.parametrize("damage", ["empty", "truncated", "huge-header", "absurd-config"])
def test_a_damaged_model_folder_is_refused_in_one_line(vqa_folder, images, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(vqa_folder, model)
    weights = model / "model.safetensors"
    if damage == "empty":
        weights.write_bytes(b"")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "huge-header":
        weights.write_bytes((10**15).to_bytes(8, "little") + b"{}")
    else:
        config = json.loads((model / "config.json").read_text())
        config["hidden_size"] = config["intermediate_size"] = 10**9
        (model / "config.json").write_text(json.dumps(config))
    rows = write_csv(tmp_path / "rows.csv", vqa_rows("why?"))
    result = run_lapvqa("answer", model, "--input", rows, "--output", tmp_path / "out.jsonl", "--image-root", images)
    assert_one_line_error(result, str(model))


def test_a_missing_encoder_folder_is_refused_in_one_line(vqa_folder, encoder, images, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(vqa_folder, model)
    config = json.loads((model / "config.json").read_text())
    config["feature_recipe"]["checkpoint"] = str(tmp_path / "gone")
    (model / "config.json").write_text(json.dumps(config))
    rows = write_csv(tmp_path / "rows.csv", vqa_rows("why?"))
    for trust in ([], ["--trust-remote-code"]):  # the package's EncoderError, and the folder's own copy of it
        result = run_lapvqa("answer", model, "--input", rows, "--output", tmp_path / "out.jsonl", "--image-root",
                            images, *trust)  # fmt: skip
        assert_one_line_error(result, "the clip-vit-l14 encoder could not be loaded from", "gone")


def test_a_mistyped_model_folder_is_named_as_such(images, tmp_path):
    rows = write_csv(tmp_path / "rows.csv", vqa_rows("why?"))
    result = run_lapvqa(
        "answer", "./lapvqa-vqa-sigilp", "--input", rows, "--output", tmp_path / "o.jsonl", cwd=tmp_path
    )
    assert_one_line_error(result, "./lapvqa-vqa-sigilp: no such model folder")


def test_an_empty_list_to_a_pipeline_gives_an_empty_list(vqa_folder):
    assert pipeline(model=vqa_folder, trust_remote_code=True)([]) == []


# --- properties: any input, any kill ------------------------------------------------------------------------------


class EchoAnswerer:
    """Stands in for a model: answers a row with its question reversed, as fast as a property test needs."""

    columns, image_columns, maps, capped = ("image", "question"), ["image"], None, {}

    def identity(self) -> dict:
        return {"format": 2, "model": "echo"}

    def answer(self, rows):
        return [{"row": row.index, "input": row.values, **({"error": row.problem} if row.problem else
                 {"answer": row.values["question"][::-1]})} for row, _ in rows]  # fmt: skip


cells = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
column_names = st.sampled_from(["image", "question", "answer", "row", "error", "map", "input", "note", ""])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.dictionaries(column_names, cells | st.integers() | st.none(), max_size=6), min_size=1,
                     max_size=8))  # fmt: skip
def test_any_jsonl_input_gives_one_line_per_row_in_order_with_the_row_unchanged(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("property")
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    try:
        output = answer_dataset("echo", path, folder / "out.jsonl", answerer=EchoAnswerer(), **QUIET)
    except AnswerError as error:
        assert "no row has this model's columns" in str(error)
        return
    found = lines(output)
    assert [line["row"] for line in found] == list(range(len(rows)))
    assert [line["input"] for line in found] == rows
    for line in found:
        assert ("answer" in line) != ("error" in line)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    questions=st.lists(cells.filter(str.strip), min_size=1, max_size=9),
    kills=st.lists(st.integers(min_value=0, max_value=4), max_size=3),
    torn=st.binary(max_size=20).filter(lambda b: b"\n" not in b),
    batch_size=st.integers(min_value=1, max_value=4),
)
def test_any_sequence_of_kills_and_torn_writes_resumes_to_the_uninterrupted_output(
    tmp_path_factory, questions, kills, torn, batch_size
):
    folder = tmp_path_factory.mktemp("resume")
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps({"image": "x.png", "question": q}) + "\n" for q in questions))
    expected = lines(answer_dataset("echo", path, folder / "full.jsonl", answerer=EchoAnswerer(), **QUIET))
    output, part = folder / "out.jsonl", folder / ".out.jsonl.part-000-of-001.jsonl"
    for batches_before_the_kill in kills:
        answerer, calls = EchoAnswerer(), []

        def dies(rows, answerer=answerer, calls=calls, limit=batches_before_the_kill):
            if len(calls) == limit:
                raise KeyboardInterrupt
            calls.append(1)
            return EchoAnswerer.answer(answerer, rows)

        answerer.answer = dies
        try:
            answer_dataset("echo", path, output, batch_size=batch_size, answerer=answerer, **QUIET)
        except KeyboardInterrupt:
            if part.exists():
                with open(part, "ab") as file:
                    file.write(torn)  # the kill tore the line being written
    answer_dataset("echo", path, output, batch_size=batch_size, answerer=EchoAnswerer(), **QUIET)
    assert lines(output) == expected
    assert not part.exists()


def test_reading_keeps_csv_cells_as_text(tmp_path):
    path = write_csv(tmp_path / "rows.csv", [{"image": "a.png", "question": "why?", "extra": "3"}])
    (row,) = read_input(path, ("image", "question"))
    assert row.values == {"image": "a.png", "question": "why?", "extra": "3"} and row.problem is None


# --- valid set-ups, and set-ups that cannot work ------------------------------------------------------------------


@pytest.mark.parametrize("count", ["0", "-3"])
def test_a_synthetic_release_of_no_subjects_is_refused(tmp_path, capsys, count):
    from lapvqa_hf.cli import main as lapvqa

    for dataset in ("mimic", "vindr-cxr"):
        assert (
            lapvqa(
                ["data", "synthesize", "--dataset", dataset, "--subjects", count, "--output", str(tmp_path / dataset)]
            )
            == 1
        )
        assert "--subjects must be at least 1" in capsys.readouterr().err
        assert not (tmp_path / dataset).exists()


def test_features_of_a_release_whose_files_folder_links_to_another_disk(tmp_path):
    import dataclasses

    from lapvqa_hf import LapvqaImageProcessor, LapvqaVisionConfig, LapvqaVisionModel
    from lapvqa_hf.data import load_mimic_diff_vqa, write_synthetic_mimic_diff_vqa
    from lapvqa_hf.features import FeatureStore, extract_features, images_of, recipe_for

    release = write_synthetic_mimic_diff_vqa(tmp_path / "mimic", num_subjects=2)
    (release / "files").rename(tmp_path / "other-disk")
    (release / "files").symlink_to(tmp_path / "other-disk", target_is_directory=True)
    rows = [row for split in load_mimic_diff_vqa(release).values() for row in split]
    images = images_of(rows, root=Path(os.path.abspath(release)))
    assert all(key.startswith("files/") for key in images), "keys relative to the release, as without the link"
    encoder = LapvqaVisionModel(LapvqaVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                   intermediate_size=48, image_size=28))  # fmt: skip
    recipe = dataclasses.replace(recipe_for("lapvqa-vit-l14"), image_size=28, vis_dim=32)
    processor = LapvqaImageProcessor(size={"height": 28, "width": 28}, resize_mode="stretch")
    extract_features(images, recipe, tmp_path / "features", encoder, processor, progress=False)
    assert set(FeatureStore(tmp_path / "features")._tensors) == set(images)


def test_a_too_long_question_to_a_pipeline_is_one_clean_error_without_a_tokenizer_warning(vqa_folder, images, capfd):
    pipe = pipeline(model=vqa_folder, trust_remote_code=True)
    capfd.readouterr()
    with pytest.raises(
        ValueError, match=r"^The question has 60 tokens; this model's 40 learned positions hold at most"
    ):
        pipe({"image": str(images / "a.png"), "question": " ".join(["the"] * 60)})
    assert "Token indices sequence length" not in capfd.readouterr().err


def test_evaluate_refuses_a_damaged_model_folder_in_one_line(diffvqa_folder, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(diffvqa_folder, model)
    (model / "model.safetensors").write_bytes(b"")
    result = run_lapvqa("evaluate", model, "--data-root", tmp_path, "--features", tmp_path / "features")
    assert_one_line_error(result, f"{model}: the model could not be loaded")


def test_evaluate_names_a_missing_model_folder(tmp_path, capsys):
    from lapvqa_hf.cli import main as lapvqa

    missing = str(tmp_path / "no-such-model")
    assert lapvqa(["evaluate", missing, "--data-root", str(tmp_path), "--features", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {missing}: no such model folder."
