"""BERTScore (Zhang et al., ICLR 2020) with a model the user names, offline-friendly.

The definition is `bert_score`'s without idf weighting or baseline rescaling (its defaults): each text is encoded by
the named model, the hidden states of layer `num_layers` of every non-special token are L2-normalised, and every
candidate token is matched greedily to its most similar reference token (precision), every reference token to its
most similar candidate token (recall); F1 is their harmonic mean, per pair, then averaged. The cards' BERTScore F1
does not name its model: `bert_score`'s default for English is `roberta-large` at layer 17.
"""

import torch

BERTSCORE_FIELDS = ("bertscore_precision", "bertscore_recall", "bertscore_f1")


class BertScoreError(ValueError):
    """The BERTScore model cannot be loaded or used; the message says which and how to get it."""


def load_bertscore_model(name: str, device: str | torch.device = "cpu"):
    """The named model (Hub id or local folder) and its tokenizer, in eval mode; one line when it cannot load."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModel.from_pretrained(name).eval().to(device)
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise BertScoreError(
            f"the BERTScore model {name} could not be loaded ({reason}); a Hub id needs the Hub once (then the "
            "Hugging Face cache serves it offline), or name a local folder."
        ) from None
    return model, tokenizer


@torch.no_grad()
def _token_embeddings(texts: list[str], model, tokenizer, num_layers: int | None, batch_size: int) -> list:
    """Per text: the normalised hidden states of its non-special tokens at layer `num_layers` (None: the last)."""
    embeddings = []
    limit = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512) or 512)
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=limit,
            return_tensors="pt",
            return_special_tokens_mask=True,
        ).to(model.device)
        special = batch.pop("special_tokens_mask").bool()
        outputs = model(**batch, output_hidden_states=True)
        layers = outputs.hidden_states
        if num_layers is not None and not 0 <= num_layers < len(layers):
            raise BertScoreError(f"num_layers={num_layers}: the model has hidden states 0..{len(layers) - 1}.")
        hidden = torch.nn.functional.normalize(layers[-1 if num_layers is None else num_layers].float(), dim=-1)
        keep = batch["attention_mask"].bool() & ~special
        embeddings += [row[mask] for row, mask in zip(hidden, keep, strict=True)]
    return embeddings


def bertscore(
    predictions: list[str],
    references: list[str],
    model,
    tokenizer,
    num_layers: int | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Mean BERTScore precision, recall and F1 of `predictions` against `references` (one each)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if not predictions:
        raise ValueError("BERTScore needs at least one prediction.")
    candidates = _token_embeddings(list(predictions), model, tokenizer, num_layers, batch_size)
    golds = _token_embeddings(list(references), model, tokenizer, num_layers, batch_size)
    scores = {field: 0.0 for field in BERTSCORE_FIELDS}
    for candidate, gold in zip(candidates, golds, strict=True):
        if len(candidate) == 0 or len(gold) == 0:  # an empty text matches nothing
            continue
        similarity = candidate @ gold.T
        precision = similarity.max(dim=1).values.mean().item()
        recall = similarity.max(dim=0).values.mean().item()
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        for field, value in zip(BERTSCORE_FIELDS, (precision, recall, f1), strict=True):
            scores[field] += value
    return {field: value / len(predictions) for field, value in scores.items()}


__all__ = ["BERTSCORE_FIELDS", "BertScoreError", "bertscore", "load_bertscore_model"]
