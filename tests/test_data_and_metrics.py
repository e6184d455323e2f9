"""MIMIC-Diff-VQA data (release layout, synthetic stand-in, plain pair files) and the offline card metrics."""

import csv
import json

import pytest
from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu

from lapvqa_hf import LapvqaImageProcessor
from lapvqa_hf.data import (
    METADATA_FILE,
    QUESTIONS_FILE,
    DataError,
    frontal_images,
    load_mimic_diff_vqa,
    load_pairs,
    write_synthetic_mimic_diff_vqa,
)
from lapvqa_hf.metrics import cider, corpus_bleu, load_metric, mean_rouge, radgraph_f1, score_answers, tokenize


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_synthetic_mimic_diff_vqa(tmp_path_factory.mktemp("mimic"), num_subjects=10, seed=1)


def test_synthetic_release_has_the_real_layout(release):
    with open(release / QUESTIONS_FILE) as file:
        assert next(csv.reader(file)) == [
            "study_id",
            "subject_id",
            "ref_id",
            "question_type",
            "question",
            "answer",
            "split",
        ]
    with open(release / METADATA_FILE) as file:
        rows = list(csv.DictReader(file))
    assert {r["ViewPosition"] for r in rows} >= {"LATERAL"} and {r["ViewPosition"] for r in rows} & {"PA", "AP"}
    first = rows[0]
    path = (
        release
        / "files"
        / f"p{first['subject_id'][:2]}"
        / f"p{first['subject_id']}"
        / f"s{first['study_id']}"
        / f"{first['dicom_id']}.jpg"
    )
    assert path.is_file()


def test_loading_joins_frontal_images_per_split(release):
    data = load_mimic_diff_vqa(release)
    assert set(data) == {"train", "validation", "test"}
    assert sum(len(split) for split in data.values()) == 30  # 10 subjects x 3 questions
    row = data["train"][0]
    assert row["ref_study_id"] != row["study_id"]
    for key in ("prior_image", "current_image"):
        assert row[key].endswith("f.jpg"), "the frontal image, never the lateral one"
    pixels = LapvqaImageProcessor(image_size=28)(row["current_image"])["pixel_values"]
    assert pixels.shape == (1, 3, 28, 28)
    assert set(data["train"]["question_type"]) == {"difference", "presence", "location"}


def test_frontal_choice_prefers_pa_then_the_smallest_dicom_id(tmp_path):
    rows = [
        ("b", "1", "s1", "AP"),
        ("a", "1", "s1", "AP"),
        ("z", "1", "s1", "PA"),  # PA wins despite its id
        ("c", "1", "s2", "AP"),
        ("b", "1", "s2", "AP"),  # smallest id among APs
        ("d", "1", "s3", "LATERAL"),  # no frontal image: the study is left out
    ]
    with open(tmp_path / METADATA_FILE, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns", "StudyDate"])
        writer.writerows([(*row, 1, 1, "21500101") for row in rows])
    assert frontal_images(tmp_path / METADATA_FILE) == {"s1": "files/p1/p1/ss1/z.jpg", "s2": "files/p1/p1/ss2/b.jpg"}


def test_questions_without_a_frontal_image_are_dropped_and_bad_splits_refused(release, tmp_path):
    for name in (METADATA_FILE, QUESTIONS_FILE):
        (tmp_path / name).write_text((release / name).read_text())
    with open(tmp_path / QUESTIONS_FILE, "a") as file:
        file.write("99999999,10000000,50000000,presence,is there an effusion?,no,train\n")
    assert sum(len(s) for s in load_mimic_diff_vqa(tmp_path, image_root=release).values()) == 30
    with open(tmp_path / QUESTIONS_FILE, "a") as file:
        file.write("50000001,10000000,50000000,presence,is there an effusion?,no,dev\n")
    with pytest.raises(DataError, match="line 33: unknown split 'dev'"):
        load_mimic_diff_vqa(tmp_path, image_root=release)


def test_missing_files_and_columns_are_named(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_mimic_diff_vqa(tmp_path)
    (tmp_path / METADATA_FILE).write_text("dicom_id,subject_id\n")
    with pytest.raises(DataError, match=r"missing columns \['study_id', 'ViewPosition'"):
        load_mimic_diff_vqa(tmp_path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_plain_pair_files_resolve_relative_paths(release, tmp_path, suffix):
    data = load_mimic_diff_vqa(release)["train"]
    rows = [
        {
            "prior_image": r["prior_image"],
            "current_image": r["current_image"],
            "question": r["question"],
            "answer": r["answer"],
        }
        for r in data.select(range(3))
    ]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(open(rows[0]["prior_image"], "rb").read())
    rows[0]["prior_image"] = "images/a.jpg"
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".csv":
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows))
    pairs = load_pairs(path)
    assert len(pairs) == 3 and pairs[0]["prior_image"] == str((tmp_path / "images" / "a.jpg").resolve())
    assert pairs["question_type"] == ["unknown"] * 3


def test_pair_files_missing_columns_are_refused(tmp_path):
    (tmp_path / "pairs.csv").write_text("prior_image,question\nx.jpg,q\n")
    with pytest.raises(DataError, match=r"missing columns \['current_image', 'answer'\]"):
        load_pairs(tmp_path / "pairs.csv")


def test_bleu_by_hand():
    scores = corpus_bleu(["the cat sat on the mat"], ["the cat is on the mat"])
    # unigrams 5/6; bigrams 3/5 (the cat, on the, the mat); trigrams 1/4 (on the mat); no 4-gram; no brevity penalty
    assert scores["bleu1"] == pytest.approx(5 / 6)
    assert scores["bleu2"] == pytest.approx((5 / 6 * 3 / 5) ** 0.5)
    assert scores["bleu3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert scores["bleu4"] == 0.0
    short = corpus_bleu(["the cat"], ["the cat is on the mat"])  # brevity penalty exp(1 - 6/2)
    assert short["bleu1"] == pytest.approx(2.718281828 ** (1 - 3))


def test_bleu_equals_nltk_on_a_corpus():
    predictions = [
        "the left pleural effusion has increased.",
        "nothing has changed since then.",
        "the main image has an additional finding of edema than the reference image.",
        "no change in the effusion",
    ]
    references = [
        "the left pleural effusion has increased in size.",
        "nothing has changed since then.",
        "the main image has an additional finding of pleural effusion than the reference image.",
        "no change in the heart size",
    ]
    ours = corpus_bleu(predictions, references)
    for n in range(1, 5):
        expected = nltk_corpus_bleu(
            [[tokenize(r)] for r in references], [tokenize(p) for p in predictions], weights=tuple([1 / n] * n)
        )
        assert ours[f"bleu{n}"] == pytest.approx(expected, abs=1e-12)


def test_answers_shorter_than_n_contribute_no_n_grams():
    # "yes" has no bigram: the bigram precision is 1/1 from "nothing has" alone (nltk would count a phantom 1).
    scores = corpus_bleu(["yes", "nothing has"], ["no", "nothing has"])
    assert scores["bleu1"] == pytest.approx(2 / 3) and scores["bleu2"] == pytest.approx((2 / 3 * 1 / 1) ** 0.5)


def test_rouge_by_hand():
    scores = mean_rouge(["a b c d", "x"], ["a c b d", "y"])
    # answer 1: all unigrams shared (F 1.0), LCS "a c d" / "a b d" = 3 of 4 (F 0.75); answer 2: nothing shared
    assert scores == {"rouge1": pytest.approx(0.5), "rougeL": pytest.approx(0.375)}


def test_cider_is_pycocoevalcaps_on_normalised_tokens():
    from pycocoevalcap.cider.cider import Cider

    predictions = ["The left effusion has increased.", "nothing has changed", "no"]
    references = ["the left pleural effusion has increased", "nothing has changed", "yes"]
    expected, _ = Cider().compute_score(
        {i: [" ".join(tokenize(r))] for i, r in enumerate(references)},
        {i: [" ".join(tokenize(p))] for i, p in enumerate(predictions)},
    )
    assert cider(predictions, references) == pytest.approx(expected)
    assert cider(["x y z"], ["a b c"]) == 0.0, "nothing shared scores 0"


def test_scores_per_question_type_and_overall():
    results = score_answers(["yes", "no", "left"], ["yes", "yes", "left"], ["presence", "presence", "location"])
    assert results["presence"]["count"] == 2 and results["presence"]["bleu1"] == pytest.approx(0.5)
    assert results["location"]["rouge1"] == 1.0 and results["overall"]["count"] == 3
    assert results["overall"]["rouge1"] == pytest.approx(2 / 3)
    assert set(results["overall"]) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rougeL", "cider", "count"}


def test_evaluate_modules_load_offline_and_agree():
    predictions, references = ["the cat sat on the mat"], ["the cat is on the mat"]
    assert load_metric("lapvqa_bleu").compute(predictions=predictions, references=references) == corpus_bleu(
        predictions, references
    )
    assert load_metric("lapvqa_rouge").compute(predictions=predictions, references=references) == mean_rouge(
        predictions, references
    )
    with pytest.raises(ValueError, match="unknown metric 'meteor'"):
        load_metric("meteor")


def test_radgraph_says_clearly_when_it_is_not_available():
    try:
        import radgraph  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="RadGraph-F1 needs the optional `radgraph` package"):
            radgraph_f1(["a"], ["a"])
    else:
        assert 0.0 <= radgraph_f1(["no effusion"], ["no effusion"]) <= 1.0


def test_cli_writes_a_synthetic_release(tmp_path, capsys):
    from lapvqa_hf.cli import main as lapvqa

    assert lapvqa(["data", "synthesize", "--output", str(tmp_path / "mimic"), "--subjects", "5"]) == 0
    assert "'train': 9" in capsys.readouterr().out
    assert len(load_mimic_diff_vqa(tmp_path / "mimic")["train"]) == 9
