"""MIMIC-Diff-VQA and MIMIC-CXR report data (release layout, synthetic stand-in, plain files) and the card metrics."""

import csv
import gzip
import json
import re
import shutil

import pytest
from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu

from lapvqa_hf import LapvqaImageProcessor
from lapvqa_hf.data import (
    METADATA_FILE,
    QUESTIONS_FILE,
    SPLIT_FILE,
    DataError,
    frontal_images,
    load_mimic_cxr_reports,
    load_mimic_diff_vqa,
    load_pairs,
    load_reports,
    report_sections,
    report_text,
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
    pixels = LapvqaImageProcessor(size={"height": 28, "width": 28})(row["current_image"])["pixel_values"]
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
    with pytest.raises(DataError, match=r"\(\['current_image', 'answer'\] missing\)"):
        load_pairs(tmp_path / "pairs.csv")


# A MIMIC-CXR-style report (made up): a wet read, an inline header, wrapped lines, a header seen twice.
REPORT = """                                 FINAL REPORT
 WET READ: ___ ___ 10:30 PM  Small left effusion.
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with dyspnea.  NG tube: check position.

 FINDINGS:  PA and lateral views of the chest.  There is a small left
 pleural effusion.   No pneumothorax.

 IMPRESSION:

 1. Small left pleural effusion.
 2. No pneumothorax.
 FINDINGS:  Heart size is normal.
"""


def test_report_sections_and_the_text_taken_from_them():
    sections = report_sections(REPORT)
    assert list(sections) == ["wet read", "examination", "indication", "findings", "impression"]
    assert sections["indication"] == "___F with dyspnea. NG tube: check position.", "mixed-case colons are no header"
    assert sections["findings"] == (
        "PA and lateral views of the chest. There is a small left pleural effusion. No pneumothorax. "
        "Heart size is normal."
    )
    assert report_text(REPORT) == f"{sections['findings']} 1. Small left pleural effusion. 2. No pneumothorax."
    assert report_text(REPORT, ["IMPRESSION"]) == "1. Small left pleural effusion. 2. No pneumothorax."
    assert report_text("FINAL REPORT\n No headers at all.") == ""


def test_synthetic_reports_describe_the_synthetic_images(release):
    data = load_mimic_cxr_reports(release)
    assert {split: len(rows) for split, rows in data.items()} == {"train": 12, "validation": 4, "test": 4}
    reports = {row["study_id"]: row for row in data["train"]}
    for question in load_mimic_diff_vqa(release)["train"].filter(lambda q: q["question_type"] == "location"):
        current = reports[question["study_id"]]
        assert current["image"] == question["current_image"], "the same frontal image as the DiffVQA pair"
        if question["answer"] == "no pleural effusion":
            assert current["report"].endswith(
                "There is no pleural effusion or pneumothorax. "
                "The cardiomediastinal silhouette is within normal limits. No acute cardiopulmonary process."
            )
        else:
            assert f" {question['answer']} pleural effusion. No pneumothorax is seen." in current["report"]
    for report in data["train"]["report"]:
        assert "INDICATION" not in report and "shortness of breath" not in report, "FINDINGS + IMPRESSION only"
    impressions = load_mimic_cxr_reports(release, sections=("impression",))["train"]["report"]
    assert set(impressions) <= {"No acute cardiopulmonary process."} | {
        f"{size} {side} pleural effusion." for size in ("Small", "Moderate", "Large") for side in ("left", "right")
    }


def test_report_loading_skips_studies_without_a_report_and_reads_gzipped_tables(release, tmp_path):
    shutil.copytree(release / "files", tmp_path / "files")
    for name in (METADATA_FILE, SPLIT_FILE):
        with open(release / name, "rb") as source, gzip.open(tmp_path / f"{name}.gz", "wb") as target:
            target.write(source.read())  # as PhysioNet ships them
    rows = load_mimic_cxr_reports(tmp_path)["train"]
    (tmp_path / "files" / "p10" / f"p{rows[0]['subject_id']}" / f"s{rows[0]['study_id']}.txt").unlink()
    (tmp_path / "files" / "p10" / f"p{rows[1]['subject_id']}" / f"s{rows[1]['study_id']}.txt").write_text(
        "FINAL REPORT\n INDICATION: no findings or impression sections.\n"
    )
    assert load_mimic_cxr_reports(tmp_path)["train"]["study_id"] == rows["study_id"][2:]
    with gzip.open(tmp_path / f"{SPLIT_FILE}.gz", "at") as file:
        file.write("x,1,1,train\n")  # harmless: an image that is not a study's frontal one
    assert len(load_mimic_cxr_reports(tmp_path)["train"]) == 10
    (tmp_path / f"{SPLIT_FILE}.gz").unlink()
    with pytest.raises(DataError, match="mimic-cxr-2.0.0-split.csv: no such file"):
        load_mimic_cxr_reports(tmp_path)


def test_reports_of_images_missing_from_the_split_table_are_refused(release, tmp_path):
    (tmp_path / METADATA_FILE).write_text((release / METADATA_FILE).read_text())
    lines = (release / SPLIT_FILE).read_text().splitlines()
    (tmp_path / SPLIT_FILE).write_text("\n".join(line for line in lines if not line.startswith("00000000-00f")))
    with pytest.raises(DataError, match="no split for image 00000000-00f \\(study 50000000\\)"):
        load_mimic_cxr_reports(tmp_path, image_root=release)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_plain_report_files_resolve_relative_paths(release, tmp_path, suffix):
    image = load_mimic_cxr_reports(release)["train"][0]["image"]
    (tmp_path / "images").mkdir()
    shutil.copy(image, tmp_path / "images" / "a.jpg")
    rows = [{"image": "images/a.jpg", "report": "No  acute\n process."}, {"image": image, "report": "Effusion."}]
    path = tmp_path / f"reports{suffix}"
    if suffix == ".csv":
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["image", "report"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows))
    reports = load_reports(path)
    assert reports["image"] == [str((tmp_path / "images" / "a.jpg").resolve()), image]
    assert reports["report"] == ["No acute process.", "Effusion."]
    (tmp_path / "bad.csv").write_text("image,text\na.jpg,x\n")
    with pytest.raises(DataError, match=r"\(\['report'\] missing\)"):
        load_reports(tmp_path / "bad.csv")


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
    printed = capsys.readouterr().out
    assert (
        "questions {'test': 3, 'train': 9, 'validation': 3}, reports {'test': 2, 'train': 6, 'validation': 2}"
        in printed
    )
    assert len(load_mimic_diff_vqa(tmp_path / "mimic")["train"]) == 9


def test_synthesize_never_writes_into_an_existing_release(release, tmp_path, capsys):
    from lapvqa_hf.cli import main as lapvqa

    questions = (release / "mimic_pair_questions.csv").read_bytes()
    assert lapvqa(["data", "synthesize", "--output", str(release), "--subjects", "3"]) == 1
    (error,) = capsys.readouterr().err.splitlines()
    assert error == f"error: {release} exists and is not empty; synthesize writes a new release: choose a new --output."
    assert (release / "mimic_pair_questions.csv").read_bytes() == questions
    assert lapvqa(["data", "synthesize", "--output", str(tmp_path / "new"), "--subjects", "3"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["new"], "written beside, then renamed into place"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"prior_image,current_image,question,answer\na.png,b.png,caf\xe9?,no\n", "not UTF-8 text (byte 0xe9"),
        (b"", "no rows"),
        (b"prior_image,current_image,question,answer\na.png,b.png,,no\n", "line 2: question: missing or empty"),
    ],
    ids=["latin-1", "empty", "empty-question"],
)
def test_pair_files_that_cannot_be_read_are_one_line_errors(tmp_path, content, message):
    (tmp_path / "pairs.csv").write_bytes(content)
    with pytest.raises(DataError, match=re.escape(message)):
        load_pairs(tmp_path / "pairs.csv")
