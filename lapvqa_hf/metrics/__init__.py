"""Offline evaluation metrics of the LAPVQA cards, as plain functions and as `evaluate` modules; detection mAP."""

from pathlib import Path

import evaluate

from .detection import score_detections
from .retrieval import score_retrieval
from .scoring import cider, corpus_bleu, mean_rouge, radgraph_f1, score_answers, tokenize

METRIC_MODULES = ("lapvqa_bleu", "lapvqa_rouge", "lapvqa_bertscore")


def load_metric(name: str) -> evaluate.EvaluationModule:
    """`evaluate.load` of a metric module shipped in this package (never fetched from the Hub)."""
    if name not in METRIC_MODULES:
        raise ValueError(f"unknown metric {name!r}; available: {METRIC_MODULES}.")
    return evaluate.load(str(Path(__file__).parent / name))


__all__ = [
    "cider",
    "corpus_bleu",
    "load_metric",
    "mean_rouge",
    "radgraph_f1",
    "score_answers",
    "score_detections",
    "score_retrieval",
    "tokenize",
]
