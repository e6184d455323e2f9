"""`lapvqa answer`: a model over a file of rows, in input order, each image encoded once, resumable after a kill,
sharded over processes, with pictures of where the model looked."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import accelerate_launch
from lapvqa_hf.convert.original import CaptioningModel, DetectionHead, DiffVQAHead, VQAHead, randomize_
from PIL import Image
from test_image_processing import write_dicom
from test_pipelines import QUESTIONS, TINY_HEAD, convert, tiny_clip_folder
from transformers import pipeline

from lapvqa_hf import LapvqaImageProcessor
from lapvqa_hf.answer import Answerer, answer_dataset, patch_grid
from lapvqa_hf.cli import main as lapvqa

QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """A folder of X-rays (8- and 16-bit PNG, DICOM), a broken file, and DiffVQA rows that share images."""
    folder = tmp_path_factory.mktemp("studies")
    generator = np.random.default_rng(7)
    for i in range(3):
        Image.fromarray(generator.integers(0, 255, (40 + i, 36), dtype=np.uint8)).save(folder / f"p{i}.png")
    Image.fromarray(generator.integers(200, 3000, (50, 44), dtype=np.uint16)).save(folder / "c16.png")
    write_dicom(folder / "c.dcm", generator.integers(0, 4096, (48, 40)), "MONOCHROME1", window=(2048, 4096))
    (folder / "broken.png").write_bytes(b"not a png at all")
    rows = [
        {"prior_image": "p0.png", "current_image": "c16.png", "question": QUESTIONS[0]},
        {"prior_image": "p0.png", "current_image": "c16.png", "question": QUESTIONS[1]},
        {"prior_image": "p1.png", "current_image": "c.dcm", "question": QUESTIONS[2]},
        {"prior_image": "p1.png", "current_image": "missing.png", "question": QUESTIONS[3]},
        {"prior_image": "p2.png", "current_image": "broken.png", "question": QUESTIONS[0]},
        {"prior_image": "p2.png", "current_image": "c.dcm", "question": QUESTIONS[3]},
        {"prior_image": "p0.png", "current_image": "c.dcm", "question": QUESTIONS[1]},
    ]
    with open(folder / "diffvqa.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder, rows


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def diffvqa_folder(tmp_path_factory, encoder_folder):
    head = DiffVQAHead(vis_dim=1024, **TINY_HEAD)
    return convert("diffvqa", head, tmp_path_factory.mktemp("diffvqa"), encoder_folder, "--num-heads", "4")


def error_lines(stderr: str) -> list[str]:
    """What the command said of the failure (transformers' weight-loading progress bar also writes to stderr)."""
    return [line for line in stderr.splitlines() if "error" in line.lower() and "Loading weights" not in line]


def lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path).read().splitlines()]


def test_every_row_is_answered_as_the_pipeline_answers_it_in_input_order(studies, diffvqa_folder, tmp_path):
    folder, rows = studies
    answerer = Answerer(diffvqa_folder, generate_kwargs={"max_new_tokens": 6})
    output = answer_dataset(diffvqa_folder, folder / "diffvqa.csv", tmp_path / "a.jsonl", batch_size=3,
                            answerer=answerer, **QUIET)  # fmt: skip
    found = lines(output)
    assert [line["row"] for line in found] == list(range(len(rows)))
    pipe = pipeline(model=diffvqa_folder, trust_remote_code=True)
    for line, row in zip(found, rows, strict=True):
        assert line["input"] == row, "every input column as it was read"
        if row["current_image"] in ("missing.png", "broken.png"):
            continue
        expected = pipe({k: str(folder / v) if k != "question" else v for k, v in row.items()}, max_new_tokens=6)
        assert line["answer"] == expected["answer"]
    assert answerer.images.encoded == 7, "p0 p1 p2 c16 c.dcm, and the two bad images: each encoded once"
    assert not list(tmp_path.glob(".a.jsonl.part-*")), "the part files are merged and removed"


def test_a_bad_row_is_reported_with_its_reason_and_the_run_goes_on(studies, diffvqa_folder, tmp_path, capsys):
    folder, _ = studies
    arguments = ["--input", str(folder / "diffvqa.csv"), "--max-new-tokens", "4", "--device", "cpu"]
    assert lapvqa(["answer", diffvqa_folder, *arguments, "--output", str(tmp_path / "a.jsonl")]) == 0
    found = lines(tmp_path / "a.jsonl")
    assert found[3]["error"] == f"current_image: {folder / 'missing.png'}: no such image file."
    assert found[4]["error"].startswith(f"current_image: {folder / 'broken.png'}: cannot read it as an image")
    assert all("answer" in line for i, line in enumerate(found) if i not in (3, 4))
    assert "7 rows (1 process), 2 skipped with an error" in capsys.readouterr().out


def test_a_killed_run_resumes_and_loses_at_most_the_batch_in_flight(studies, diffvqa_folder, tmp_path):
    folder, rows = studies
    options = dict(batch_size=2, answerer=None, generate_kwargs={"max_new_tokens": 5}, **QUIET)
    complete = lines(answer_dataset(diffvqa_folder, folder / "diffvqa.csv", tmp_path / "full.jsonl", **options))

    class Killed(Exception):
        pass

    answerer = Answerer(diffvqa_folder, generate_kwargs={"max_new_tokens": 5})
    real_answer, calls = answerer.answer, []

    def killed_at_the_third_batch(batch):
        calls.append(batch)
        if len(calls) == 3:
            raise Killed
        return real_answer(batch)

    answerer.answer = killed_at_the_third_batch
    output = tmp_path / "resumed.jsonl"
    with pytest.raises(Killed):
        answer_dataset(diffvqa_folder, folder / "diffvqa.csv", output, batch_size=2, answerer=answerer, **QUIET)
    part = tmp_path / ".resumed.jsonl.part-000-of-001.jsonl"
    assert not output.exists() and len(lines(part)) == 1 + 4, "header + two finished batches"
    with open(part, "a") as file:
        file.write('{"row": 4, "prior_ima')  # torn by the kill mid-write
    answerer.answer, calls[:] = real_answer, []
    resumed = Answerer(diffvqa_folder, generate_kwargs={"max_new_tokens": 5})
    answer_dataset(diffvqa_folder, folder / "diffvqa.csv", output, batch_size=2, answerer=resumed, **QUIET)
    assert lines(output) == complete
    assert resumed.images.encoded == 4, "only the images of rows 4-6: p2, broken, c.dcm, p0"


def test_a_partial_output_of_another_run_is_not_resumed(studies, diffvqa_folder, tmp_path, capsys):
    folder, rows = studies
    part = tmp_path / ".a.jsonl.part-000-of-001.jsonl"
    part.write_text('{"lapvqa_answer": {"input_sha256": "0000"}}\n{"row": 0, "answer": "stale"}\n')
    arguments = ["--input", str(folder / "diffvqa.csv"), "--output", str(tmp_path / "a.jsonl"), "--device", "cpu"]
    assert lapvqa(["answer", diffvqa_folder, *arguments, "--max-new-tokens", "3"]) == 1
    (error,) = error_lines(capsys.readouterr().err)
    assert "holds rows of another run" in error
    assert lapvqa(["answer", diffvqa_folder, *arguments, "--max-new-tokens", "3", "--overwrite"]) == 0
    assert len(lines(tmp_path / "a.jsonl")) == len(rows)


def test_two_processes_with_accelerate_give_the_single_process_output(studies, diffvqa_folder, tmp_path):
    folder, _ = studies
    single = lines(answer_dataset(diffvqa_folder, folder / "diffvqa.csv", tmp_path / "one.jsonl", batch_size=2,
                                  generate_kwargs={"max_new_tokens": 4}, **QUIET))  # fmt: skip
    arguments = [diffvqa_folder, "--input", folder / "diffvqa.csv", "--output", tmp_path / "two.jsonl", "--batch-size",
                 "2", "--max-new-tokens", "4"]  # fmt: skip
    result = accelerate_launch("lapvqa_hf.answer", arguments, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "7 rows (2 processes)" in result.stdout and result.stdout.count("wrote ") == 1, "merged once, by rank 0"
    assert lines(tmp_path / "two.jsonl") == single


@pytest.mark.parametrize(
    ("kind", "head", "columns"),
    [
        ("vqa", lambda: VQAHead(vis_dim=1024, **TINY_HEAD), ("image", "question")),
        ("detection", lambda: DetectionHead(vis_dim=1024, d_model=32, dim_feedforward=48), ("image",)),
    ],
)
def test_vqa_and_detection_rows_answer_as_their_pipelines(studies, encoder_folder, tmp_path, kind, head, columns):
    folder, _ = studies
    extra = ["--num-heads", "4"] if kind == "vqa" else []
    model = convert(kind, head(), tmp_path, encoder_folder, *extra)
    rows = [{"image": name, "question": QUESTIONS[i]} for i, name in enumerate(["p0.png", "c16.png", "c.dcm"])]
    with open(tmp_path / "rows.jsonl", "w") as file:
        file.writelines(json.dumps({c: row[c] for c in columns}) + "\n" for row in rows)
    options = {"generate_kwargs": {"max_new_tokens": 5}} if kind == "vqa" else {"threshold": 0.0}
    found = lines(answer_dataset(model, tmp_path / "rows.jsonl", tmp_path / "out.jsonl", batch_size=2, image_root=folder,
                                 save_maps=tmp_path / "maps", **options, **QUIET))  # fmt: skip
    pipe = pipeline(model=model, trust_remote_code=True)
    for line, row in zip(found, rows, strict=True):
        image = str(folder / row["image"])
        if kind == "vqa":
            assert line["answer"] == pipe({"image": image, "question": row["question"]}, max_new_tokens=5)["answer"]
        else:
            expected = pipe(image, threshold=0.0)
            assert [b["label"] for b in line["boxes"]] == [b["label"] for b in expected]
            assert all(abs(a["box"][k] - b["box"][k]) < 0.02 for a, b in zip(line["boxes"], expected, strict=True)
                       for k in a["box"])  # fmt: skip
        height, width = LapvqaImageProcessor().load_image(image).shape[:2]
        size = Image.open(line["map"]).size
        if kind == "vqa":
            assert size[0] == 320 and size[1] > 340, "the image, its caption below"
        else:
            assert max(size) == 640 and abs(size[0] / size[1] - width / height) < 0.03, "scaled, shape kept"


def test_report_generation_rows_write_the_models_reports(studies, tmp_path):
    folder, _ = studies
    upstream = CaptioningModel(img_size=28, patch_size=14, vision_width=64, vision_depth=1, vision_heads=4, **TINY_HEAD)
    torch.save(randomize_(upstream, seed=5).state_dict(), tmp_path / "model_best.pt")
    model = str(tmp_path / "captioning")
    heads = ["--num-heads", "4", "--vision-num-heads", "4"]
    assert lapvqa(["convert", "captioning", str(tmp_path / "model_best.pt"), *heads, "--output", model]) == 0
    (tmp_path / "rows.csv").write_text("image\np0.png\nc.dcm\nmissing.png\n")
    found = lines(answer_dataset(model, tmp_path / "rows.csv", tmp_path / "out.jsonl", image_root=folder,
                                 generate_kwargs={"max_new_tokens": 6}, **QUIET))  # fmt: skip
    pipe = pipeline(model=model, trust_remote_code=True)
    for line, name in zip(found[:2], ["p0.png", "c.dcm"], strict=True):
        assert line["report"] == pipe(str(folder / name), max_new_tokens=6)[0]["generated_text"]
    assert found[2]["error"].endswith("missing.png: no such image file.")


def test_diffvqa_heat_maps_show_both_images_with_the_question_and_answer(studies, diffvqa_folder, tmp_path):
    folder, rows = studies
    found = lines(answer_dataset(diffvqa_folder, folder / "diffvqa.csv", tmp_path / "a.jsonl", batch_size=4,
                                 save_maps=tmp_path / "maps", generate_kwargs={"max_new_tokens": 6}, **QUIET))  # fmt: skip
    plain = lines(answer_dataset(diffvqa_folder, folder / "diffvqa.csv", tmp_path / "b.jsonl", batch_size=4,
                                 generate_kwargs={"max_new_tokens": 6}, **QUIET))  # fmt: skip
    assert [line.get("answer") for line in found] == [line.get("answer") for line in plain], "eager = sdpa answers"
    pictures = sorted((tmp_path / "maps").glob("*.png"))
    assert [p.name for p in pictures] == ["0000000.png", "0000001.png", "0000002.png", "0000005.png", "0000006.png"]
    picture = np.asarray(Image.open(pictures[0]))
    assert picture.shape[1] == 640, "prior and current side by side"
    assert (picture[20:340, :, 0].astype(int) - picture[20:340, :, 2]).max() > 50, "a red-yellow heat map over grey"


def test_attention_maps_are_read_on_the_encoders_patch_grid():
    assert patch_grid(np.arange(16.0)).shape == (4, 4)
    assert patch_grid(np.arange(1 + 576.0)).shape == (24, 24), "Florence-2: its leading mean token is dropped"
    assert patch_grid(np.arange(255.0)) is None, "CoCa's 255 pooled tokens are no patch grid"


def test_rows_without_the_models_columns_are_refused_in_one_line(diffvqa_folder, tmp_path, capsys):
    (tmp_path / "rows.csv").write_text("image,question\na.png,why?\n")
    assert lapvqa(["answer", diffvqa_folder, "--input", str(tmp_path / "rows.csv"), "--output",
                   str(tmp_path / "o.jsonl"), "--device", "cpu"]) == 1  # fmt: skip
    (error,) = error_lines(capsys.readouterr().err)
    assert "needs the columns ['prior_image', 'current_image', 'question']; the header has" in error
    assert not (tmp_path / "o.jsonl").exists()


def test_the_readmes_dataset_command_runs(studies, diffvqa_folder, tmp_path, monkeypatch):
    import re
    import shlex
    import shutil
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (command,) = re.findall(r"## A whole dataset\n\n```bash\n(.*?)\n```", readme, re.S)
    arguments = shlex.split(command)
    assert arguments[:2] == ["lapvqa", "answer"] and arguments[2] == "dmusingu/lapvqa-diffvqa-clip-vit-l14"
    folder, rows = studies
    shutil.copy(folder / "diffvqa.csv", tmp_path / "pairs.csv")
    monkeypatch.chdir(tmp_path)
    arguments = [diffvqa_folder if a == arguments[2] else a for a in arguments[1:]]
    assert lapvqa([*arguments, "--image-root", str(folder), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert len(lines(tmp_path / "answers.jsonl")) == len(rows) and len(list((tmp_path / "maps").glob("*.png"))) == 5


def test_coca_heat_maps_carry_the_pooled_tokens_attention_back_onto_the_patches(studies, tmp_path):
    from test_coca_encoder import converted_tiny_coca

    folder, rows = studies
    encoder = converted_tiny_coca(tmp_path / "coca")  # 4 x 4 patches, 9 pooler queries: 8 tokens
    torch.save(randomize_(DiffVQAHead(vis_dim=768, **TINY_HEAD), seed=3).state_dict(), tmp_path / "coca_best.pt")
    model = str(tmp_path / "lapvqa-diffvqa-coca")
    arguments = ["--encoder", "coca", "--encoder-checkpoint", str(encoder), "--num-heads", "4", "--output", model]
    assert lapvqa(["convert", "diffvqa", str(tmp_path / "coca_best.pt"), *arguments]) == 0
    answerer = Answerer(model, generate_kwargs={"max_new_tokens": 4}, save_maps=tmp_path / "maps")
    path = str(folder / "p0.png")
    tokens, _, to_patches = answerer.images.get([path])[path]
    assert tokens.shape == (8, 768) and to_patches.shape == (8, 16)
    torch.testing.assert_close(to_patches.sum(dim=-1), torch.ones(8))
    found = lines(answer_dataset(model, folder / "diffvqa.csv", tmp_path / "a.jsonl", answerer=answerer, **QUIET))
    answered = [line for line in found if "answer" in line]
    assert answered and all(Path(line["map"]).is_file() for line in answered)
