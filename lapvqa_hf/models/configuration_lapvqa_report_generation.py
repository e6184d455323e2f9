"""LAPVQA report-generation head configuration."""

from huggingface_hub.dataclasses import strict

from .configuration_lapvqa_diffvqa import LapvqaDiffVQAConfig

_REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_lapvqa_report_generation.LapvqaReportGenerationConfig",
    "AutoModel": "modeling_lapvqa_report_generation.LapvqaReportGenerationModel",
    "AutoModelForCausalLM": "modeling_lapvqa_report_generation.LapvqaReportGenerationModel",
}


@strict
class LapvqaReportGenerationConfig(LapvqaDiffVQAConfig):
    r"""
    Configuration of [`LapvqaReportGenerationModel`]: the upstream `ReportGenerationHead` (`dmusingu/lapvqa-rrg`,
    `dmusingu/lapvqa-rrg-native`), which writes the report of one chest X-ray from an encoder's patch tokens. It is
    the VQA decoder without the question: a report is `[bos] + report + [eos]` and generation starts from `[bos]`.
    Every field means what it means in [`LapvqaDiffVQAConfig`]; `max_position_embeddings` is the longest report
    (+ bos) and, like every size, is read from the weights at conversion.

    Args:
        training_results (`dict`, *optional*): the upstream checkpoint's own record (`epoch`, `val_bleu4`: the
            validation BLEU-4 at the saved epoch).
    """

    model_type = "lapvqa_report_generation"
    remote_auto_map = _REMOTE_AUTO_MAP

    max_position_embeddings: int = 256
    training_results: dict | None = None


__all__ = ["LapvqaReportGenerationConfig"]
