"""Corpus BLEU-1..4 of LAPVQA answers, as an `evaluate` metric that works offline (shipped with lapvqa-hf)."""

import datasets
import evaluate

from lapvqa_hf.metrics.scoring import corpus_bleu


class LapvqaBleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Cumulative corpus BLEU-1..4 on lower-cased alphanumeric words, no smoothing (as nltk).",
            citation="Papineni et al., BLEU: a Method for Automatic Evaluation of Machine Translation, ACL 2002.",
            inputs_description="predictions: list of generated answers; references: one reference answer each.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, max_order: int = 4):
        return corpus_bleu(predictions, references, max_order=max_order)
