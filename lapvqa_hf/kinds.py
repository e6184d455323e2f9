"""The model kinds of the LAPVQA collection, one object each.

A `ModelKind` says everything the package needs of a kind: its `model_type`, configuration and model classes and the
Auto classes they serve, its pipeline (task name and class), the input columns of `lapvqa answer` and how a row
becomes model inputs, its converter (`lapvqa convert <command>`), its model card (text, tags, usage snippet), its Hub
pipeline tag and its training task. Registration with transformers, the pipelines saved into folders, `lapvqa
answer`, training, the CLI, `lapvqa push`, the collection manifest and the cards all loop over `KINDS`; nothing else
branches on `model_type`. A new kind is its own configuration, modeling, pipeline and converter files and one
`register_kind(ModelKind(...))` here.

The registry is tooling: model folders (remote code) never need it, so it stays out of what they ship. Converters
and training tasks are named by import path (`"module:attribute"`), imported when used.
"""

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForObjectDetection,
    AutoProcessor,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.dynamic_module_utils import custom_object_save
from transformers.pipelines import PIPELINE_REGISTRY

from .models.configuration_lapvqa_captioning import LapvqaCaptioningConfig
from .models.configuration_lapvqa_coca import LapvqaCocaVisionConfig
from .models.configuration_lapvqa_detection import LapvqaDetectionConfig
from .models.configuration_lapvqa_diffvqa import LapvqaDiffVQAConfig
from .models.configuration_lapvqa_grounding import LapvqaGroundingConfig
from .models.configuration_lapvqa_report_generation import LapvqaReportGenerationConfig
from .models.configuration_lapvqa_two_tower import LapvqaTwoTowerConfig, LapvqaTwoTowerTextConfig
from .models.configuration_lapvqa_vision import LapvqaVisionConfig
from .models.configuration_lapvqa_vqa import LapvqaVQAConfig
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
from .models.pipeline_lapvqa import (
    LapvqaCaptioningPipeline,
    LapvqaDetectionPipeline,
    LapvqaDiffVQAPipeline,
    LapvqaImageEmbeddingPipeline,
    LapvqaReportGenerationPipeline,
    LapvqaVQAPipeline,
    LapvqaZeroShotFindingsPipeline,
)
from .models.pipeline_lapvqa_grounding import LapvqaGroundingPipeline
from .models.processing_lapvqa import LapvqaProcessor, LapvqaTwoTowerProcessor

AUTO_CLASSES = {
    cls.__name__: cls
    for cls in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForObjectDetection)
}


@dataclass(frozen=True)
class Answering:
    """How `lapvqa answer` reads a row for this kind, and what it writes.

    `columns` are the input columns; `images` maps each image column to the model argument its encoded tokens
    become (in the order of the model's visual memory); `prompt_column` holds the text that prompts the model (None:
    generation starts from bos); `field` names the model's output field; `picture` what `--save-maps` draws
    (`"attention"`: heat maps of the answer's cross-attention; `"boxes"`; None: nothing)."""

    columns: tuple[str, ...]
    images: dict[str, str]
    field: str
    prompt_column: str | None = None
    picture: str | None = None

    # What a row's answer is, by output field: boxes are detected, a phrase's box grounded, scores ranked, everything
    # else generated text.
    MODES = {"boxes": "detect", "box": "ground", "scores": "score"}
    # The pipeline method that answers a batch of encoded images, per mode.
    BATCH_METHODS = {"generate": "generate_texts", "detect": "detect", "ground": "ground", "score": "score"}

    @property
    def mode(self) -> str:
        return self.MODES.get(self.field, "generate")

    @property
    def batch_method(self) -> str:
        return self.BATCH_METHODS[self.mode]

    @property
    def generates_text(self) -> bool:
        return self.mode == "generate"


@dataclass(frozen=True)
class ImageEmbedding:
    """How a kind's model embeds an image as one vector (`lapvqa probe`): `what` it is, in words, and `of(model,
    pixel_values)` computing it, `[images, width]`, from images prepared by the folder's image processor."""

    what: str
    of: Callable[[PreTrainedModel, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CardText:
    """What a kind's model card says: its description (`{encoder}` is the encoder's label), training data, tags,
    dataset ids, licence and usage snippet (`{repo_id}`, `{encoder_note}`, `{images}` filled in)."""

    description: str
    training_data: str
    task_tags: tuple[str, ...]
    datasets: tuple[str, ...]
    usage: str
    dataset_tags: tuple[str, ...] = ("mimic-cxr",)
    license: str = "apache-2.0"


@dataclass(frozen=True)
class ModelKind:
    name: str  # the collection manifest's kind
    model_type: str
    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    hub_pipeline_tag: str  # a task transformers has, for the Hub (the folders' own pipelines are custom)
    card: CardText
    auto_classes: tuple[str, ...] = ("AutoModel",)
    image_processor: bool = True  # AutoImageProcessor serves LapvqaImageProcessor for this model type
    processor: type | None = None  # what AutoProcessor serves (image processor + tokenizer), if anything
    pipeline_task: str | None = None
    pipeline_class: type | None = None
    more_pipelines: tuple[tuple[str, type], ...] = ()  # further (task, class) pipelines the folders ship
    tower_models: tuple[tuple[type[PreTrainedConfig], type[PreTrainedModel]], ...] = ()  # towers AutoModel serves alone
    answering: Answering | None = None
    converter: str | object | None = None  # a module path, or a module-like object: add_arguments, run, convert_entry
    converter_command: str | None = None  # `lapvqa convert <command>` (default: the kind's name)
    converter_help: str = ""
    training_task: str | object | None = None  # "module:Class" (or the class) with from_config / from_model_config
    image_embedding: ImageEmbedding | None = None  # one vector per image, where the model gives one
    extra: dict = field(default_factory=dict)

    @property
    def pipelines(self) -> dict[str, type]:
        """Every pipeline of the kind, by task: the main one first."""
        main = {self.pipeline_task: self.pipeline_class} if self.pipeline_class is not None else {}
        return {**main, **dict(self.more_pipelines)}

    @property
    def command(self) -> str:
        return self.converter_command or self.name

    def converter_module(self):
        """The converter: its module (imported now) or the object given."""
        return importlib.import_module(self.converter) if isinstance(self.converter, str) else self.converter

    def training_task_class(self):
        if not isinstance(self.training_task, str):
            return self.training_task
        module, _, attribute = self.training_task.partition(":")
        return getattr(importlib.import_module(module), attribute)


KINDS: dict[str, ModelKind] = {}


def register_kind(kind: ModelKind) -> ModelKind:
    """Adds `kind` to `KINDS` and registers it with transformers: its configuration and model with the Auto classes
    (and for remote-code export, so that `save_pretrained` writes `auto_map` and copies the model files), its image
    processor and processor, and its pipeline with transformers' pipeline registry."""
    AutoConfig.register(kind.model_type, kind.config_class, exist_ok=True)
    for name in kind.auto_classes:
        AUTO_CLASSES[name].register(kind.config_class, kind.model_class, exist_ok=True)
    kind.config_class.register_for_auto_class()
    kind.model_class.register_for_auto_class("AutoModel")
    if kind.image_processor:
        # transformers' PIL backend (no torchvision needed); where torchvision is installed, AutoImageProcessor
        # falls back to it.
        AutoImageProcessor.register(kind.config_class, image_processor_classes={"pil": LapvqaImageProcessor},
                                    exist_ok=True)  # fmt: skip
    if kind.processor is not None:
        AutoProcessor.register(kind.config_class, kind.processor, exist_ok=True)
    for config_class, model_class in kind.tower_models:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
    for task, pipeline_class in kind.pipelines.items():
        PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=pipeline_class, pt_model=AutoModel, type="multimodal")
    KINDS[kind.name] = kind
    return kind


def kind_of(model_type: str) -> ModelKind | None:
    """The kind of a `model_type`, or None."""
    return next((kind for kind in KINDS.values() if kind.model_type == model_type), None)


def save_pretrained_with_pipeline(model: PreTrainedModel, folder: str | os.PathLike) -> None:
    """`model.save_pretrained(folder)`, with the model's pipeline named in `config.json` (`custom_pipelines`) and its
    file (and the files it imports) copied beside it, so that `transformers.pipeline(model=folder,
    trust_remote_code=True)` needs nothing but the folder."""
    kind = kind_of(model.config.model_type)
    pipelines = kind.pipelines if kind is not None else {}
    if pipelines:
        model.config.custom_pipelines = {
            task: {"impl": f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}", "pt": ["AutoModel"]}
            for task, cls in pipelines.items()
        }
    model.save_pretrained(folder)
    for pipeline_class in pipelines.values():
        custom_object_save(pipeline_class, folder)


# --- the kinds of the collection --------------------------------------------------------------------------------

IMAGES_NOTE = "# Images: PNG or JPEG (8 or 16 bit) or DICOM paths (DICOM needs pydicom), PIL images or arrays."
ENCODER_NOTE = (
    "# The pipeline loads the frozen {encoder} encoder from its own repo (once; the Hugging Face cache serves it "
    "offline)."
)
HELD_ENCODER_NOTE = (
    "# This repo holds the head and its {encoder} encoder, fine-tuned together: the pipeline needs nothing else."
)
NATIVE_ENCODER_NOTE = (
    "# This head was trained with its {encoder} encoder fine-tuned, which this repo does not hold: the pipeline\n"
    '# refuses to run from images until that encoder is named (see "The fine-tuned encoder" below).'
)

register_kind(ModelKind(
    name="diffvqa",
    model_type=LapvqaDiffVQAConfig.model_type,
    config_class=LapvqaDiffVQAConfig,
    model_class=LapvqaDiffVQAModel,
    auto_classes=("AutoModel", "AutoModelForCausalLM"),
    processor=LapvqaProcessor,
    pipeline_task="lapvqa-diffvqa",
    pipeline_class=LapvqaDiffVQAPipeline,
    hub_pipeline_tag="image-text-to-text",
    answering=Answering(
        columns=("prior_image", "current_image", "question"),
        images={"prior_image": "prior_image_features", "current_image": "current_image_features"},
        field="answer",
        prompt_column="question",
        picture="attention",
    ),
    converter="lapvqa_hf.convert.diffvqa",
    converter_help="a DiffVQAHead state dict ({encoder}_best.pt)",
    training_task="lapvqa_hf.train.tasks:DiffVQATask",
    card=CardText(
        description=(
            "Differential visual question answering on chest X-rays: given the frozen {encoder} encoder's patch "
            "tokens of a *prior* (reference) and a *current* study, a 6-layer transformer decoder answers a question "
            "about the change between them (MIMIC-Diff-VQA)."
        ),
        training_data="MIMIC-Diff-VQA (MIMIC-CXR studies)",
        task_tags=("visual-question-answering", "differential-vqa"),
        datasets=("mimic-diff-vqa", "mimic-cxr"),
        usage="""from transformers import pipeline

{encoder_note}
pipe = pipeline(model="{repo_id}", trust_remote_code=True)
{images}
question = "what has changed compared to the reference image?"
print(pipe({{"prior_image": "prior.png", "current_image": "current.png", "question": question}}, max_new_tokens=64))""",
    ),
))  # fmt: skip

register_kind(ModelKind(
    name="vqa",
    model_type=LapvqaVQAConfig.model_type,
    config_class=LapvqaVQAConfig,
    model_class=LapvqaVQAModel,
    auto_classes=("AutoModel", "AutoModelForCausalLM"),
    processor=LapvqaProcessor,
    pipeline_task="lapvqa-vqa",
    pipeline_class=LapvqaVQAPipeline,
    hub_pipeline_tag="image-text-to-text",
    answering=Answering(
        columns=("image", "question"),
        images={"image": "image_features"},
        field="answer",
        prompt_column="question",
        picture="attention",
    ),
    converter="lapvqa_hf.convert.vqa",
    converter_help="a single-image VQAHead state dict ({encoder}_best.pt)",
    card=CardText(
        description=(
            "Visual question answering on chest X-rays: given the frozen {encoder} encoder's patch tokens of one "
            "study, a 6-layer transformer decoder answers a free-text question about it."
        ),
        training_data="MIMIC-CXR question-answer pairs",
        task_tags=("visual-question-answering",),
        datasets=("mimic-cxr",),
        usage="""from transformers import pipeline

{encoder_note}
pipe = pipeline(model="{repo_id}", trust_remote_code=True)
{images}
print(pipe({{"image": "chest_xray.png", "question": "is there a pleural effusion?"}}, max_new_tokens=32))""",
    ),
))  # fmt: skip

register_kind(ModelKind(
    name="captioning",
    model_type=LapvqaCaptioningConfig.model_type,
    config_class=LapvqaCaptioningConfig,
    model_class=LapvqaCaptioningModel,
    auto_classes=("AutoModel", "AutoModelForImageTextToText"),
    processor=LapvqaProcessor,
    pipeline_task="lapvqa-report-generation",
    pipeline_class=LapvqaCaptioningPipeline,
    hub_pipeline_tag="image-text-to-text",
    answering=Answering(columns=("image",), images={"image": "image_features"}, field="report"),
    converter="lapvqa_hf.convert.captioning",
    converter_help="the captioning model (model_best.pt: ViT-L/14 + report decoder)",
    training_task="lapvqa_hf.train.tasks:CaptioningTask",
    card=CardText(
        description=(
            "Radiology report generation: a ViT-L/14 encoder and a 6-layer causal transformer decoder trained from "
            "scratch on MIMIC-CXR to write the full report of a chest X-ray."
        ),
        training_data="MIMIC-CXR reports",
        task_tags=("radiology-report-generation", "image-captioning"),
        datasets=("mimic-cxr",),
        usage="""from transformers import pipeline

pipe = pipeline(model="{repo_id}", trust_remote_code=True)
{images}
print(pipe("chest_xray.png", max_new_tokens=128)[0]["generated_text"])""",
    ),
))  # fmt: skip

register_kind(ModelKind(
    name="vision-encoder",
    model_type=LapvqaVisionConfig.model_type,
    config_class=LapvqaVisionConfig,
    model_class=LapvqaVisionModel,
    processor=LapvqaProcessor,
    hub_pipeline_tag="image-feature-extraction",
    image_embedding=ImageEmbedding("the normed CLS token (pooler_output)", lambda model, pixels: model(
        pixel_values=pixels).pooler_output),
    converter="lapvqa_hf.convert.vision_encoder",
    converter_help="the captioning-pretrained ViT-L/14 alone (encoder_final.pt)",
    card=CardText(
        description=(
            "A LAPVQA-pretrained ViT-L/14, {encoder}: a frozen chest X-ray feature extractor whose patch tokens "
            "(`[batch, 256, 1024]` at 224 px) feed the LAPVQA task heads; the captioning-pretrained one is the "
            "collection's strongest."
        ),
        training_data="MIMIC-CXR reports (captioning objective)",
        task_tags=("feature-extraction", "vision-transformer"),
        datasets=("mimic-cxr",),
        usage="""from transformers import AutoImageProcessor, AutoModel

repo = "{repo_id}"
image_processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
encoder = AutoModel.from_pretrained(repo, trust_remote_code=True)

pixel_values = image_processor("chest_xray.png")["pixel_values"]  # PNG/JPEG or DICOM
patch_tokens = encoder(pixel_values).last_hidden_state  # [1, num_patches, 1024], CLS dropped
print(patch_tokens.shape)""",
    ),
))  # fmt: skip

register_kind(ModelKind(
    name="coca-vision-encoder",
    model_type=LapvqaCocaVisionConfig.model_type,
    config_class=LapvqaCocaVisionConfig,
    model_class=LapvqaCocaVisionModel,
    image_processor=False,  # CoCa keeps open_clip's preprocessing, saved with it as a CLIPImageProcessor
    hub_pipeline_tag="image-feature-extraction",
    converter="lapvqa_hf.convert.coca_encoder",
    converter_command="coca-encoder",
    converter_help="open_clip's CoCa ViT-L/14 image tower (open_clip_pytorch_model.bin)",
    card=CardText(
        description=(
            "The image tower of open_clip's CoCa ViT-L/14 (LAION-2B, fine-tuned on MSCOCO captions), converted to "
            "Transformers: the frozen encoder of the LAPVQA CoCa heads. Its attentional pooler gives 255 image "
            "tokens (`[batch, 255, 768]`) and CoCa's contrastive image embedding; no open_clip is needed to run it."
        ),
        training_data="LAION-2B image-text pairs, then MSCOCO captions (by the open_clip authors)",
        task_tags=("feature-extraction", "vision-transformer", "coca", "open_clip"),
        datasets=("laion/laion2B-en", "mscoco"),
        dataset_tags=(),  # not trained on chest X-rays
        license="mit",  # the weights are open_clip's
        usage="""from transformers import AutoImageProcessor, AutoModel
from PIL import Image

repo = "{repo_id}"
image_processor = AutoImageProcessor.from_pretrained(repo)  # open_clip's evaluation transform
encoder = AutoModel.from_pretrained(repo, trust_remote_code=True)

pixel_values = image_processor(Image.open("chest_xray.png").convert("RGB"), return_tensors="pt")["pixel_values"]
outputs = encoder(pixel_values)
print(outputs.last_hidden_state.shape)  # [1, 255, 768]: the tokens the LAPVQA CoCa heads take
print(outputs.image_embeds.shape)  # [1, 768]: CoCa's contrastive image embedding""",
    ),
))  # fmt: skip

register_kind(ModelKind(
    name="detection",
    model_type=LapvqaDetectionConfig.model_type,
    config_class=LapvqaDetectionConfig,
    model_class=LapvqaDetectionModel,
    auto_classes=("AutoModel", "AutoModelForObjectDetection"),
    pipeline_task="lapvqa-abnormality-detection",
    pipeline_class=LapvqaDetectionPipeline,
    hub_pipeline_tag="object-detection",
    answering=Answering(columns=("image",), images={"image": "image_features"}, field="boxes", picture="boxes"),
    converter="lapvqa_hf.convert.detection",
    converter_help="a DETR-style DetectionHead checkpoint ({encoder}.pt, VinDr-CXR)",
    training_task="lapvqa_hf.train.tasks:DetectionTask",
    card=CardText(
        description=(
            "Abnormality detection on chest X-rays: a DETR-style head (2 encoder layers, 20 object queries, 3 "
            "decoder layers) over the frozen {encoder} encoder's patch tokens predicts boxes of VinDr-CXR's 14 "
            "abnormality classes."
        ),
        training_data="VinDr-CXR (radiologist-annotated boxes)",
        task_tags=("object-detection", "vindr-cxr", "detr"),
        datasets=("vindr-cxr",),
        usage="""from transformers import pipeline

{encoder_note}
pipe = pipeline(model="{repo_id}", trust_remote_code=True)
{images}
for finding in pipe("chest_xray.png", threshold=0.1):  # boxes in the original image's pixels
    print(finding["label"], round(finding["score"], 2), finding["box"])""",
    ),
))  # fmt: skip

register_kind(ModelKind(
    name="two-tower",
    model_type=LapvqaTwoTowerConfig.model_type,
    config_class=LapvqaTwoTowerConfig,
    model_class=LapvqaTwoTowerModel,
    processor=LapvqaTwoTowerProcessor,
    tower_models=((LapvqaTwoTowerTextConfig, LapvqaTwoTowerTextModel),),
    pipeline_task="lapvqa-zero-shot-findings",
    pipeline_class=LapvqaZeroShotFindingsPipeline,
    more_pipelines=(("lapvqa-image-embedding", LapvqaImageEmbeddingPipeline),),
    hub_pipeline_tag="zero-shot-image-classification",
    # `labels`: the candidate findings of the row, separated by ";"
    answering=Answering(columns=("image", "labels"), images={"image": "image_embeds"}, field="scores"),
    image_embedding=ImageEmbedding(
        "the projected image embedding (get_image_features(...).pooler_output)",
        lambda model, pixels: model.get_image_features(pixel_values=pixels).pooler_output,
    ),
    converter="lapvqa_hf.convert.two_tower",
    training_task="lapvqa_hf.train.tasks:TwoTowerTask",
    converter_help="a two-tower ContrastiveModel (model_best.pt or model_epochXXX.pt: ViT-L/14 + report encoder)",
    card=CardText(
        description=(
            "Image-report pretraining on chest X-rays: a ViT-L/14 image encoder and a 6-layer bidirectional report "
            "encoder projected into one 512-d space, trained on MIMIC-CXR image/report pairs with the {encoder} "
            "objective. Zero-shot findings, image/report retrieval and frozen-embedding linear probes."
        ),
        training_data="MIMIC-CXR image/report pairs",
        task_tags=("zero-shot-image-classification", "image-text-retrieval", "contrastive-learning"),
        datasets=("mimic-cxr",),
        usage="""from transformers import pipeline

pipe = pipeline("lapvqa-zero-shot-findings", model="{repo_id}", trust_remote_code=True)
{images}
findings = ["pleural effusion", "cardiomegaly", "pneumothorax", "no acute cardiopulmonary process"]
print(pipe("chest_xray.png", candidate_labels=findings))

embed = pipeline("lapvqa-image-embedding", model="{repo_id}", trust_remote_code=True)
print(len(embed("chest_xray.png")))  # the L2-normalised 512-d image embedding""",
    ),
))  # fmt: skip

register_kind(ModelKind(
    name="report-generation",
    model_type=LapvqaReportGenerationConfig.model_type,
    config_class=LapvqaReportGenerationConfig,
    model_class=LapvqaReportGenerationModel,
    auto_classes=("AutoModel", "AutoModelForCausalLM"),
    processor=LapvqaProcessor,
    pipeline_task="lapvqa-rrg",
    pipeline_class=LapvqaReportGenerationPipeline,
    hub_pipeline_tag="image-text-to-text",  # transformers 5 has no "image-to-text" task any more
    answering=Answering(columns=("image",), images={"image": "image_features"}, field="report", picture="attention"),
    converter="lapvqa_hf.convert.report_generation",
    converter_help="a ReportGenerationHead checkpoint ({encoder}.pt of lapvqa-rrg / lapvqa-rrg-native)",
    training_task="lapvqa_hf.train.tasks:ReportGenerationTask",
    card=CardText(
        description=(
            "Radiology report generation on chest X-rays: given the {encoder} encoder's patch tokens of one study, a "
            "transformer decoder writes its MIMIC-CXR report (findings and impression)."
        ),
        training_data="MIMIC-CXR reports",
        task_tags=("radiology-report-generation", "image-to-text"),
        datasets=("mimic-cxr",),
        usage="""from transformers import pipeline

{encoder_note}
pipe = pipeline(model="{repo_id}", trust_remote_code=True)
{images}
print(pipe("chest_xray.png", max_new_tokens=128)[0]["generated_text"])""",
    ),
))  # fmt: skip

register_kind(ModelKind(
    name="grounding",
    model_type=LapvqaGroundingConfig.model_type,
    config_class=LapvqaGroundingConfig,
    model_class=LapvqaGroundingModel,
    pipeline_task="lapvqa-phrase-grounding",
    pipeline_class=LapvqaGroundingPipeline,
    hub_pipeline_tag="zero-shot-object-detection",
    # `phrase`: the text to ground; the output's `box` is in the original image's pixels.
    answering=Answering(columns=("image", "phrase"), images={"image": "image_features"}, field="box", picture="boxes"),
    converter="lapvqa_hf.convert.grounding",
    converter_help="a TransVG-style VisualGroundingHead checkpoint ({encoder}.pt of lapvqa-pg, MS-CXR phrases)",
    training_task="lapvqa_hf.train.tasks:GroundingTask",
    card=CardText(
        description=(
            "Phrase grounding on chest X-rays: a TransVG-style head reads a learned [REG] token, the frozen {encoder} "
            "encoder's patch tokens and a phrase's text embedding through a 3-layer transformer encoder and "
            "regresses one box for the phrase (MS-CXR)."
        ),
        training_data="MS-CXR (radiologists' boxes of report phrases on MIMIC-CXR images)",
        task_tags=("zero-shot-object-detection", "phrase-grounding", "visual-grounding", "ms-cxr"),
        datasets=("ms-cxr", "mimic-cxr"),
        usage="""from transformers import pipeline

{encoder_note}
# Each phrase is embedded by the text tower named in config.json (`text_recipe`), also loaded once.
pipe = pipeline(model="{repo_id}", trust_remote_code=True)
{images}
phrases = ["small left pleural effusion", "enlarged cardiac silhouette"]
for found in pipe("chest_xray.png", candidate_labels=phrases):  # one box per phrase, in the image's pixels
    print(found["label"], found["box"])""",
    ),
))  # fmt: skip

LapvqaImageProcessor.register_for_auto_class("AutoImageProcessor")
LapvqaProcessor.register_for_auto_class("AutoProcessor")
LapvqaTwoTowerProcessor.register_for_auto_class("AutoProcessor")


__all__ = [
    "KINDS",
    "Answering",
    "CardText",
    "ImageEmbedding",
    "ModelKind",
    "kind_of",
    "register_kind",
    "save_pretrained_with_pipeline",
]
