"""LAPVQA single-image VQA head configuration."""

from huggingface_hub.dataclasses import strict

from .configuration_lapvqa_diffvqa import LapvqaDiffVQAConfig

_REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_lapvqa_vqa.LapvqaVQAConfig",
    "AutoModel": "modeling_lapvqa_vqa.LapvqaVQAModel",
    "AutoModelForCausalLM": "modeling_lapvqa_vqa.LapvqaVQAModel",
}


@strict
class LapvqaVQAConfig(LapvqaDiffVQAConfig):
    r"""
    Configuration of [`LapvqaVQAModel`]: the upstream `VQAHead` (`dmusingu/lapvqa-vqa`), which answers a question
    about one chest X-ray from the frozen encoder's patch tokens. It is the DiffVQA decoder without the frame
    embedding; every field means what it means in [`LapvqaDiffVQAConfig`], with the upstream card's defaults:
    150 learned positions (question + `[bos]` + answer + `[eos]`) and `tok_emb` tied to `lm_head`.
    """

    model_type = "lapvqa_vqa"
    remote_auto_map = _REMOTE_AUTO_MAP

    max_position_embeddings: int = 150
    tie_word_embeddings: bool = True


__all__ = ["LapvqaVQAConfig"]
