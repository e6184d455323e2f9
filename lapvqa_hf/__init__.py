"""Transformers-native LAPVQA chest X-ray models.

Importing the package registers every model kind (`lapvqa_hf.kinds`) with Transformers: the classes with its Auto
classes and the pipelines with its pipeline registry, and the classes for remote-code export so that
`save_pretrained` writes `auto_map` and copies the model files.
"""

from . import compatibility  # noqa: F401  (first of the package's modules: it refuses an unsupported transformers)
from .kinds import KINDS, ModelKind, register_kind  # registers every kind with transformers
from .models.configuration_lapvqa_captioning import LapvqaCaptioningConfig
from .models.configuration_lapvqa_coca import LapvqaCocaVisionConfig
from .models.configuration_lapvqa_detection import LapvqaDetectionConfig
from .models.configuration_lapvqa_diffvqa import LapvqaDiffVQAConfig
from .models.configuration_lapvqa_grounding import LapvqaGroundingConfig
from .models.configuration_lapvqa_report_generation import LapvqaReportGenerationConfig
from .models.configuration_lapvqa_two_tower import LapvqaTwoTowerConfig, LapvqaTwoTowerTextConfig
from .models.configuration_lapvqa_vision import LapvqaVisionConfig
from .models.configuration_lapvqa_vqa import LapvqaVQAConfig
from .models.encoders import ENCODER_WIDTHS, RECIPES, EncoderRecipe
from .models.image_processing_lapvqa import LapvqaImageProcessor
from .models.modeling_lapvqa_captioning import LapvqaCaptioningModel
from .models.modeling_lapvqa_coca import LapvqaCocaVisionModel
from .models.modeling_lapvqa_detection import LapvqaDetectionModel
from .models.modeling_lapvqa_diffvqa import LapvqaDiffVQAModel
from .models.modeling_lapvqa_grounding import LapvqaGroundingModel
from .models.modeling_lapvqa_report_generation import LapvqaReportGenerationModel
from .models.modeling_lapvqa_two_tower import LapvqaTwoTowerModel, LapvqaTwoTowerTextModel
from .models.modeling_lapvqa_vision import LapvqaVisionModel
from .models.modeling_lapvqa_vqa import LapvqaVQAModel
from .models.processing_lapvqa import LapvqaProcessor, LapvqaTwoTowerProcessor

__version__ = "0.4.0"

__all__ = [
    "ENCODER_WIDTHS",
    "KINDS",
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
    "LapvqaGroundingConfig",
    "LapvqaGroundingModel",
    "LapvqaImageProcessor",
    "LapvqaProcessor",
    "LapvqaReportGenerationConfig",
    "LapvqaReportGenerationModel",
    "LapvqaTwoTowerConfig",
    "LapvqaTwoTowerModel",
    "LapvqaTwoTowerProcessor",
    "LapvqaTwoTowerTextConfig",
    "LapvqaTwoTowerTextModel",
    "LapvqaVisionConfig",
    "LapvqaVisionModel",
    "LapvqaVQAConfig",
    "LapvqaVQAModel",
    "ModelKind",
    "register_kind",
]
