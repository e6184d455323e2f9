"""Transformers-native LAPVQA chest X-ray models.

Importing the package registers the model classes with Transformers' Auto classes and the pipelines with its
pipeline registry, and marks the classes for remote-code export so that `save_pretrained` writes `auto_map` and
copies the model files.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForObjectDetection,
    AutoProcessor,
)
from transformers.pipelines import PIPELINE_REGISTRY

from . import compatibility  # noqa: F401  (first of the package's modules: it refuses an unsupported transformers)
from .configuration_lapvqa_captioning import LapvqaCaptioningConfig
from .configuration_lapvqa_coca import LapvqaCocaVisionConfig
from .configuration_lapvqa_detection import LapvqaDetectionConfig
from .configuration_lapvqa_diffvqa import LapvqaDiffVQAConfig
from .configuration_lapvqa_vision import LapvqaVisionConfig
from .configuration_lapvqa_vqa import LapvqaVQAConfig
from .encoders import ENCODER_WIDTHS, RECIPES, EncoderRecipe
from .image_processing_lapvqa import LapvqaImageProcessor
from .modeling_lapvqa_captioning import LapvqaCaptioningModel
from .modeling_lapvqa_coca import LapvqaCocaVisionModel
from .modeling_lapvqa_detection import LapvqaDetectionModel
from .modeling_lapvqa_diffvqa import LapvqaDiffVQAModel
from .modeling_lapvqa_vision import LapvqaVisionModel
from .modeling_lapvqa_vqa import LapvqaVQAModel
from .pipeline_lapvqa import PIPELINES
from .processing_lapvqa import LapvqaProcessor

for _config, _model, _generative in (
    (LapvqaDiffVQAConfig, LapvqaDiffVQAModel, AutoModelForCausalLM),
    (LapvqaVQAConfig, LapvqaVQAModel, AutoModelForCausalLM),
    (LapvqaVisionConfig, LapvqaVisionModel, None),
    (LapvqaCaptioningConfig, LapvqaCaptioningModel, AutoModelForImageTextToText),
    (LapvqaDetectionConfig, LapvqaDetectionModel, AutoModelForObjectDetection),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    if _generative is not None:
        _generative.register(_config, _model, exist_ok=True)
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModel")
    # transformers' PIL backend (no torchvision needed); where torchvision is installed, AutoImageProcessor falls
    # back to it.
    AutoImageProcessor.register(_config, image_processor_classes={"pil": LapvqaImageProcessor}, exist_ok=True)
    if _config is not LapvqaDetectionConfig:  # detection has no text side, so no tokenizer / LapvqaProcessor
        AutoProcessor.register(_config, LapvqaProcessor, exist_ok=True)
# CoCa's image tower keeps open_clip's preprocessing, saved with it as a CLIPImageProcessor.
AutoConfig.register(LapvqaCocaVisionConfig.model_type, LapvqaCocaVisionConfig, exist_ok=True)
AutoModel.register(LapvqaCocaVisionConfig, LapvqaCocaVisionModel, exist_ok=True)
LapvqaCocaVisionConfig.register_for_auto_class()
LapvqaCocaVisionModel.register_for_auto_class("AutoModel")
for _task, _pipeline in PIPELINES.values():
    PIPELINE_REGISTRY.register_pipeline(_task, pipeline_class=_pipeline, pt_model=AutoModel, type="multimodal")
LapvqaImageProcessor.register_for_auto_class("AutoImageProcessor")
LapvqaProcessor.register_for_auto_class("AutoProcessor")

__version__ = "0.4.0"

__all__ = [
    "ENCODER_WIDTHS",
    "RECIPES",
    "EncoderRecipe",
    "LapvqaCaptioningConfig",
    "LapvqaCaptioningModel",
    "LapvqaCocaVisionConfig",
    "LapvqaCocaVisionModel",
    "LapvqaDetectionConfig",
    "LapvqaDetectionModel",
    "LapvqaDiffVQAConfig",
    "LapvqaDiffVQAModel",
    "LapvqaImageProcessor",
    "LapvqaProcessor",
    "LapvqaVisionConfig",
    "LapvqaVisionModel",
    "LapvqaVQAConfig",
    "LapvqaVQAModel",
]
