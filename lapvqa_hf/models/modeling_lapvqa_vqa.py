"""LAPVQA single-image VQA head: the DiffVQA decoder over one chest X-ray's frozen features."""

from .configuration_lapvqa_vqa import LapvqaVQAConfig
from .modeling_lapvqa_common import LapvqaSingleImageDecoderModel


class LapvqaVQAModel(LapvqaSingleImageDecoderModel):
    """The upstream `VQAHead`: answers a question about one chest X-ray.

    The visual memory is `vis_proj(image_features)` (`[B, N, hidden]`, no frame embedding); the decoder attends
    to it at every layer. Inputs follow the upstream layout `question_ids + [bos] + answer_ids + [eos]`, and
    `generate()` continues `question_ids + [bos]`, computing the cross-attention keys/values once.
    """

    config: LapvqaVQAConfig


__all__ = ["LapvqaVQAModel"]
