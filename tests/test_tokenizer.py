"""The saved GPT-2 tokenizer encodes and decodes exactly as tiktoken's gpt2 encoding."""

import pytest
import tiktoken
from transformers import AutoTokenizer

from lapvqa_hf.tokenization import encode_questions

RADIOLOGY_CORPUS = [
    "what has changed compared to the main image?",
    "Is there any change in the left lower lobe opacity since the prior study?",
    "the main image has an additional finding of pleural effusion than the reference image.",
    "FINDINGS: PA and lateral views of the chest. Interval increase in the size of the right-sided pneumothorax (~2.5 cm).",
    "IMPRESSION:\n1. No acute cardiopulmonary process.\n2. Stable 3-mm nodule in the RUL; f/u CT in 6-12 months.",
    "ET tube terminates 4.2 cm above the carina; NG tube courses below the diaphragm.",
    "Cardiomediastinal silhouette is within normal limits.  Mild bibasilar atelectasis  ",
    "s/p CABG w/ median sternotomy wires; L PICC tip @ cavoatrial junction",
    "Compared with ___ (prior), the hazy opacity at the R base has worsened!!",
    "Pneumonie basale droite? Épanchement pleural, œdème — 肺炎 ✓ 😷",
    "literal special token text <|endoftext|> stays text",
    "tabs\tand\r\nwindows line endings\n\n\n   trailing",
    "'s 't 're 've 'm 'll 'd don't it's THE'S",
    "",
    " ",
]


@pytest.fixture(scope="module")
def saved_tokenizer(gpt2_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    gpt2_tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    return tiktoken.get_encoding("gpt2")


@pytest.mark.parametrize("text", RADIOLOGY_CORPUS)
def test_encoding_equals_tiktoken(saved_tokenizer, tiktoken_gpt2, text):
    expected = tiktoken_gpt2.encode(text, disallowed_special=())
    assert saved_tokenizer(text, add_special_tokens=False)["input_ids"] == expected
    assert saved_tokenizer.decode(expected) == tiktoken_gpt2.decode(expected) == text


def test_whole_corpus_as_one_text(saved_tokenizer, tiktoken_gpt2):
    text = "\n".join(RADIOLOGY_CORPUS)
    assert saved_tokenizer(text, add_special_tokens=False)["input_ids"] == tiktoken_gpt2.encode(
        text, disallowed_special=()
    )


def test_special_tokens_are_the_upstream_ones(saved_tokenizer):
    assert len(saved_tokenizer) == 50257
    assert saved_tokenizer.bos_token_id == saved_tokenizer.eos_token_id == saved_tokenizer.pad_token_id == 50256
    assert saved_tokenizer.padding_side == "left"
    assert saved_tokenizer.decode([50256]) == "<|endoftext|>"


def test_encode_questions_appends_bos_and_left_pads(saved_tokenizer, tiktoken_gpt2):
    questions = ["what changed?", "is the effusion larger than before?"]
    batch = encode_questions(saved_tokenizer, questions)
    for row, mask, question in zip(batch.input_ids.tolist(), batch.attention_mask.tolist(), questions, strict=True):
        kept = [t for t, m in zip(row, mask, strict=True) if m]
        assert kept == tiktoken_gpt2.encode(question) + [50256]
        assert mask == sorted(mask), "padding must be on the left"


def test_encode_questions_refuses_an_empty_batch(saved_tokenizer):
    with pytest.raises(ValueError, match="at least one question"):
        encode_questions(saved_tokenizer, [])
