"""Transformers-native LAPVQA chest X-ray models.

Importing the package registers the model classes with Transformers' Auto classes, and marks them for
remote-code export so that `save_pretrained` writes `auto_map` and copies the model files.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_lapvqa_diffvqa import KNOWN_ENCODERS, LapvqaDiffVQAConfig
from .modeling_lapvqa_diffvqa import LapvqaDiffVQAModel

AutoConfig.register(LapvqaDiffVQAConfig.model_type, LapvqaDiffVQAConfig, exist_ok=True)
AutoModel.register(LapvqaDiffVQAConfig, LapvqaDiffVQAModel, exist_ok=True)
AutoModelForCausalLM.register(LapvqaDiffVQAConfig, LapvqaDiffVQAModel, exist_ok=True)
LapvqaDiffVQAConfig.register_for_auto_class()
LapvqaDiffVQAModel.register_for_auto_class("AutoModel")

__version__ = "0.1.0"

__all__ = ["KNOWN_ENCODERS", "LapvqaDiffVQAConfig", "LapvqaDiffVQAModel"]
