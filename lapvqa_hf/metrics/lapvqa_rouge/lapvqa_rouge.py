"""Mean ROUGE-1 / ROUGE-L F-measure of LAPVQA answers, as an `evaluate` metric that works offline."""

import datasets
import evaluate

from lapvqa_hf.metrics.scoring import mean_rouge


class LapvqaRouge(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Mean per-answer ROUGE-1 and ROUGE-L F-measure (rouge_score, no stemming).",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, ACL Workshop 2004.",
            inputs_description="predictions: list of generated answers; references: one reference answer each.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        return mean_rouge(predictions, references)
