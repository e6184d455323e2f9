"""Text-generation metrics of the LAPVQA cards (BLEU-1..4, ROUGE-1, ROUGE-L), computed offline.

Text is lower-cased and split into alphanumeric words (`tokenize`), the same normalisation rouge_score applies, so
BLEU and ROUGE see the same tokens. BLEU is corpus-level (clipped n-gram counts summed over the corpus, cumulative
uniform weights, brevity penalty against the reference length, no smoothing), counting n-grams as Papineni et al.
and pycocoevalcap do: an answer shorter than n contributes no n-gram (nltk's `corpus_bleu` counts one, which only
differs for such answers). ROUGE is
the mean per-answer F-measure of `rouge_score` without stemming. CIDEr is pycocoevalcap's (the captioning
papers' implementation), on the same tokens, with document frequencies from the references being scored.
"""

import math
import re
from collections import Counter

from pycocoevalcap.cider.cider import Cider
from rouge_score import rouge_scorer

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions: list[str], references: list[str], max_order: int = 4) -> dict[str, float]:
    """`{"bleu1": ..., "bleu{max_order}": ...}`: cumulative corpus BLEU-n for n = 1..max_order."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    matches, totals = [0] * max_order, [0] * max_order
    prediction_length = reference_length = 0
    for prediction, reference in zip(predictions, references, strict=True):
        hypothesis, target = tokenize(prediction), tokenize(reference)
        prediction_length += len(hypothesis)
        reference_length += len(target)
        for n in range(1, max_order + 1):
            counts, reference_counts = _ngrams(hypothesis, n), _ngrams(target, n)
            matches[n - 1] += sum(min(c, reference_counts[g]) for g, c in counts.items())
            totals[n - 1] += max(len(hypothesis) - n + 1, 0)
    if prediction_length == 0:
        return {f"bleu{n}": 0.0 for n in range(1, max_order + 1)}
    brevity = 1.0 if prediction_length > reference_length else math.exp(1 - reference_length / prediction_length)
    scores, log_sum = {}, 0.0
    for n in range(1, max_order + 1):
        if matches[n - 1] == 0 or totals[n - 1] == 0:
            log_sum = -math.inf
        else:
            log_sum += math.log(matches[n - 1] / totals[n - 1])
        scores[f"bleu{n}"] = 0.0 if log_sum == -math.inf else brevity * math.exp(log_sum / n)
    return scores


def mean_rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """`{"rouge1": ..., "rougeL": ...}`: mean F-measure over the answers."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if not predictions:
        return {"rouge1": 0.0, "rougeL": 0.0}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    scores = [
        scorer.score(reference, prediction) for prediction, reference in zip(predictions, references, strict=True)
    ]
    return {key: sum(s[key].fmeasure for s in scores) / len(scores) for key in ("rouge1", "rougeL")}


def cider(predictions: list[str], references: list[str]) -> float:
    """Corpus CIDEr (n = 1..4, sigma 6) of pycocoevalcap, one reference per answer."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if not predictions:
        return 0.0
    references_by_id = {i: [" ".join(tokenize(r))] for i, r in enumerate(references)}
    predictions_by_id = {i: [" ".join(tokenize(p))] for i, p in enumerate(predictions)}
    score, _ = Cider().compute_score(references_by_id, predictions_by_id)
    return float(score)


def score_answers(
    predictions: list[str], references: list[str], question_types: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """BLEU-1..4, ROUGE-1, ROUGE-L and CIDEr overall and per question type (`{"overall": {...}, "<type>": {...}}`)."""
    groups = {"overall": list(range(len(predictions)))}
    if question_types is not None:
        if len(question_types) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions but {len(question_types)} question types.")
        for index, question_type in enumerate(question_types):
            groups.setdefault(question_type, []).append(index)
    results = {}
    for name, indices in groups.items():
        chosen_predictions = [predictions[i] for i in indices]
        chosen_references = [references[i] for i in indices]
        results[name] = {
            **corpus_bleu(chosen_predictions, chosen_references),
            **mean_rouge(chosen_predictions, chosen_references),
            "cider": cider(chosen_predictions, chosen_references),
            "count": len(indices),
        }
    return results


def radgraph_f1(predictions: list[str], references: list[str]) -> float:
    """RadGraph-F1 (optional extra): needs the `radgraph` package and its model weights."""
    try:
        from radgraph import F1RadGraph
    except ImportError:
        raise ImportError(
            "RadGraph-F1 needs the optional `radgraph` package and its model, which it downloads from the Hub on "
            "first use: pip install radgraph, on a machine with network access (or a pre-filled cache). The other "
            "metrics work without it."
        ) from None
    score, *_ = F1RadGraph(reward_level="partial")(hyps=predictions, refs=references)
    return float(score)
