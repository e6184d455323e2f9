"""The GPT-2 vocabulary of the upstream models as a Transformers tokenizer, built from tiktoken's own files.

tiktoken fetches (or, with `TIKTOKEN_CACHE_DIR`, reads offline) GPT-2's `encoder.json` and `vocab.bpe`, checks
their sha256, and they become the tokenizer's `vocab.json` / `merges.txt`. The result encodes exactly as
`tiktoken.get_encoding("gpt2").encode(text, disallowed_special=())`: `<|endoftext|>` spelled in text stays text.
"""

import functools
import json

from tiktoken.load import read_file_cached
from transformers import BatchFeature, GPT2Tokenizer, PreTrainedTokenizerBase

from .models.processing_lapvqa import left_padded, question_prompt

GPT2_ENCODER_JSON = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_BPE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
END_OF_TEXT = "<|endoftext|>"


@functools.cache
def _gpt2_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    try:
        vocab = json.loads(read_file_cached(GPT2_ENCODER_JSON, GPT2_ENCODER_JSON_SHA256))
        merge_lines = read_file_cached(GPT2_VOCAB_BPE, GPT2_VOCAB_BPE_SHA256).decode("utf-8").split("\n")
    except Exception as error:  # network errors, hash mismatches
        raise OSError(
            "Could not get GPT-2's encoder.json / vocab.bpe through tiktoken "
            f"({type(error).__name__}). Without a network, set TIKTOKEN_CACHE_DIR to a folder holding them "
            "under tiktoken's cache names."
        ) from None
    return vocab, tuple(tuple(line.split()) for line in merge_lines[1:] if line.strip())


def build_gpt2_tokenizer(model_max_length: int = 200, append_eot: bool = False) -> GPT2Tokenizer:
    """GPT-2's byte-level BPE, left-padded with `<|endoftext|>` (the upstream bos = eos = pad, id 50256).

    `append_eot=True` gives the two-tower models' text tokenizer: every text ends in `<|endoftext|>` (kept when
    truncating; the text embedding is taken there) and batches are padded on the right."""
    vocab, merges = _gpt2_vocabulary()
    return GPT2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        padding_side="right" if append_eot else "left",
        add_eos_token=append_eot,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def encode_questions(
    tokenizer: PreTrainedTokenizerBase, questions: str | list[str], return_tensors: str = "pt"
) -> BatchFeature:
    """The question-answering heads' prompts `question + [bos]` (`question_prompt`), left-padded, with the
    attention mask `generate()` needs. Lengths are not checked here: the model refuses prompts beyond its positions."""
    if isinstance(questions, str):
        questions = [questions]
    if not questions:
        raise ValueError("encode_questions needs at least one question.")
    prompts = [question_prompt(tokenizer, question) for question in questions]
    return left_padded(prompts, tokenizer.pad_token_id, return_tensors=return_tensors)
