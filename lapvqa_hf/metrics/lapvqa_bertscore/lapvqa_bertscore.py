"""BERTScore of LAPVQA answers and reports with a model the user names, as an `evaluate` metric that works offline
(the model from a local folder or the Hugging Face cache)."""

import datasets
import evaluate

from lapvqa_hf.metrics.bertscore import bertscore, load_bertscore_model


class LapvqaBertscore(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Mean BERTScore precision, recall and F1 (greedy matching of contextual token embeddings; "
            "no idf weighting, no baseline rescaling) with the model named by `model` at layer `num_layers`.",
            citation="Zhang et al., BERTScore: Evaluating Text Generation with BERT, ICLR 2020.",
            inputs_description="predictions: generated texts; references: one reference each; model: a Hub id or "
            "local folder; num_layers: the hidden-state layer (default: the last).",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, model: str, num_layers: int | None = None, batch_size: int = 32):
        loaded, tokenizer = load_bertscore_model(model)
        return bertscore(predictions, references, loaded, tokenizer, num_layers, batch_size)
