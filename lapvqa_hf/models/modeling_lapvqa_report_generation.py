"""LAPVQA report-generation head: the single-image decoder writing a chest X-ray's report from its frozen features."""

from .configuration_lapvqa_report_generation import LapvqaReportGenerationConfig
from .modeling_lapvqa_common import LapvqaSingleImageDecoderModel


class LapvqaReportGenerationModel(LapvqaSingleImageDecoderModel):
    """The upstream `ReportGenerationHead`: writes the report of one chest X-ray.

    The visual memory is `vis_proj(image_features)` (`[B, N, hidden]`); the decoder attends to it at every layer.
    Inputs follow the upstream layout `[bos] + report_ids + [eos]` (`labels` = `input_ids` with padding at -100
    trains it), and `generate(input_ids=[[bos]], attention_mask=..., image_features=...)` writes the report,
    computing the cross-attention keys/values once per sequence.
    """

    config: LapvqaReportGenerationConfig


__all__ = ["LapvqaReportGenerationModel"]
