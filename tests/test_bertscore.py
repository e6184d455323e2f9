"""BERTScore with a model the user names: the definition (greedy matching of normalised token embeddings, special
tokens left out), the `evaluate` module, and one line when the model cannot be loaded offline."""

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from lapvqa_hf.metrics import load_metric
from lapvqa_hf.metrics.bertscore import BertScoreError, bertscore, load_bertscore_model

WORDS = ["no", "acute", "cardiopulmonary", "process", "small", "left", "pleural", "effusion", "stable", "heart", "size"]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    BertModel(config).save_pretrained(folder)
    return folder


def test_identical_texts_score_one_and_precision_and_recall_swap_with_the_texts(bert_folder):
    model, tokenizer = load_bertscore_model(str(bert_folder))
    same = bertscore(["small left pleural effusion"], ["small left pleural effusion"], model, tokenizer)
    assert all(value == pytest.approx(1.0, abs=1e-6) for value in same.values())
    one = bertscore(["no acute process"], ["stable heart size"], model, tokenizer, num_layers=1)
    other = bertscore(["stable heart size"], ["no acute process"], model, tokenizer, num_layers=1)
    assert one["bertscore_precision"] == pytest.approx(other["bertscore_recall"])
    assert one["bertscore_f1"] == pytest.approx(other["bertscore_f1"]) and one["bertscore_f1"] < 1


def test_the_score_is_greedy_matching_over_the_non_special_tokens(bert_folder):
    model, tokenizer = load_bertscore_model(str(bert_folder))
    candidate, reference = "small effusion", "left pleural effusion"

    def tokens(text):
        batch = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states[2][0]
        return torch.nn.functional.normalize(hidden[1:-1], dim=-1)  # without [CLS] and [SEP]

    similarity = tokens(candidate) @ tokens(reference).T
    precision, recall = similarity.max(1).values.mean().item(), similarity.max(0).values.mean().item()
    found = bertscore([candidate], [reference], model, tokenizer, num_layers=2)
    assert found["bertscore_precision"] == pytest.approx(precision, rel=1e-5)
    assert found["bertscore_recall"] == pytest.approx(recall, rel=1e-5)
    assert found["bertscore_f1"] == pytest.approx(2 * precision * recall / (precision + recall), rel=1e-5)


def test_the_evaluate_module_gives_the_same_scores(bert_folder):
    predictions, references = ["no acute process", "small effusion"], ["no acute cardiopulmonary process", "effusion"]
    metric = load_metric("lapvqa_bertscore")
    found = metric.compute(predictions=predictions, references=references, model=str(bert_folder), num_layers=1)
    model, tokenizer = load_bertscore_model(str(bert_folder))
    assert found == pytest.approx(bertscore(predictions, references, model, tokenizer, num_layers=1))


def test_a_model_that_cannot_be_loaded_offline_is_one_line(tmp_path):
    with pytest.raises(BertScoreError, match="could not be loaded") as error:
        load_bertscore_model("roberta-large")  # the tests run offline, with an empty cache
    assert "\n" not in str(error.value) and "local folder" in str(error.value)


def test_lapvqa_evaluate_adds_bertscore_with_the_named_model(bert_folder, tmp_path, capsys):
    import json

    from conftest import TINY_DECODER, prepare_training_release

    from lapvqa_hf import LapvqaDiffVQAConfig, LapvqaDiffVQAModel
    from lapvqa_hf.cli import main as lapvqa

    prepared = prepare_training_release(tmp_path / "release")
    torch.manual_seed(0)
    LapvqaDiffVQAModel(LapvqaDiffVQAConfig(vis_dim=32, **TINY_DECODER)).save_pretrained(tmp_path / "model")
    arguments = ["evaluate", str(tmp_path / "model"), "--data-root", str(prepared / "mimic")]
    arguments += ["--features", str(prepared / "features"), "--split", "validation", "--max-new-tokens", "4"]
    arguments += ["--output", str(tmp_path / "scores.json"), "--bertscore-model", str(bert_folder)]
    assert lapvqa([*arguments, "--bertscore-layer", "1"]) == 0
    assert "| bertscore_f1 |" in capsys.readouterr().out
    result = json.loads((tmp_path / "scores.json").read_text())
    model, tokenizer = load_bertscore_model(str(bert_folder))
    expected = bertscore(result["answers"], result["references"], model, tokenizer, num_layers=1)
    assert result["scores"]["overall"]["bertscore_f1"] == pytest.approx(expected["bertscore_f1"])
    assert lapvqa([*arguments[:-1], str(tmp_path / "no-such-model")]) == 1
    assert "could not be loaded" in capsys.readouterr().err
