"""Transformers-native LAPVQA chest X-ray models.

Importing the package registers the model classes with Transformers' Auto classes, and marks them for
remote-code export so that `save_pretrained` writes `auto_map` and copies the model files.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from .configuration_lapvqa_captioning import LapvqaCaptioningConfig
from .configuration_lapvqa_diffvqa import KNOWN_ENCODERS, LapvqaDiffVQAConfig
from .configuration_lapvqa_vision import LapvqaVisionConfig
from .modeling_lapvqa_captioning import LapvqaCaptioningModel
from .modeling_lapvqa_diffvqa import LapvqaDiffVQAModel
from .modeling_lapvqa_vision import LapvqaVisionModel

for _config, _model, _generative in (
    (LapvqaDiffVQAConfig, LapvqaDiffVQAModel, AutoModelForCausalLM),
    (LapvqaVisionConfig, LapvqaVisionModel, None),
    (LapvqaCaptioningConfig, LapvqaCaptioningModel, AutoModelForImageTextToText),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    if _generative is not None:
        _generative.register(_config, _model, exist_ok=True)
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModel")

__version__ = "0.1.0"

__all__ = [
    "KNOWN_ENCODERS",
    "LapvqaCaptioningConfig",
    "LapvqaCaptioningModel",
    "LapvqaDiffVQAConfig",
    "LapvqaDiffVQAModel",
    "LapvqaVisionConfig",
    "LapvqaVisionModel",
]
