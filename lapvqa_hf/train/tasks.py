"""The training tasks: what differs between kinds in training (data, examples and batches, the model, validation
predictions, scores, saving). `train` runs any object with the `TrainingTask` interface; a kind names its task
in the registry (`ModelKind.training_task`)."""

import dataclasses
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel, gather_object
from datasets import DatasetDict
from torch.utils.data import Subset
from transformers import AutoImageProcessor, PreTrainedModel, PreTrainedTokenizerBase

from ..data import REPORT_SECTIONS, DataError, load_mimic_cxr_reports, load_mimic_diff_vqa
from ..detection_data import load_vindr_cxr
from ..features import (
    DETECTION_IMAGE_PREPARATION,
    IMAGE_PREPARATION,
    FeatureError,
    FeatureStore,
    detection_image_processor,
    image_id,
)
from ..grounding_data import load_ms_cxr
from ..kinds import KINDS, kind_of, save_pretrained_with_pipeline
from ..messages import first_line
from ..metrics import radgraph_f1, score_answers
from ..metrics.detection import score_detections
from ..metrics.grounding import GROUNDING_METRICS, score_grounding
from ..metrics.retrieval import RETRIEVAL_METRICS, score_retrieval
from ..model_folders import load_model
from ..models.configuration_lapvqa_captioning import LapvqaCaptioningConfig
from ..models.configuration_lapvqa_detection import VINDR_CXR_CLASSES, LapvqaDetectionConfig
from ..models.configuration_lapvqa_diffvqa import LapvqaDiffVQAConfig
from ..models.configuration_lapvqa_grounding import LapvqaGroundingConfig
from ..models.configuration_lapvqa_report_generation import LapvqaReportGenerationConfig
from ..models.configuration_lapvqa_two_tower import LapvqaTwoTowerConfig
from ..models.configuration_lapvqa_vision import LapvqaVisionConfig
from ..models.encoders import ENCODER_WIDTHS, RECIPES, EncoderRecipe, load_encoder, load_encoder_image_processor
from ..models.image_processing_lapvqa import LapvqaImageProcessor
from ..models.modeling_lapvqa_captioning import LapvqaCaptioningModel
from ..models.modeling_lapvqa_detection import LapvqaDetectionModel
from ..models.modeling_lapvqa_diffvqa import LapvqaDiffVQAModel
from ..models.modeling_lapvqa_grounding import LapvqaGroundingModel
from ..models.modeling_lapvqa_report_generation import LapvqaReportGenerationModel
from ..models.modeling_lapvqa_two_tower import LapvqaTwoTowerModel, contrastive_loss, sigmoid_loss
from ..models.modeling_lapvqa_vision import LapvqaVisionModel
from ..models.processing_lapvqa import LapvqaProcessor, LapvqaTwoTowerProcessor, question_prompt
from ..models.text_towers import (
    TEXT_RECIPES,
    TextRecipe,
    encode_phrases,
    load_text_model,
    load_text_tokenizer,
    text_recipe_for,
)
from ..tokenization import build_gpt2_tokenizer, encode_questions
from .config import (
    DETECTION_METRICS,
    TASKS,
    TEXT_METRICS,
    CaptioningOptions,
    DetectionOptions,
    GroundingOptions,
    HeldEncoderOptions,
    TrainConfig,
)


class TaskDefaults:
    """What a task inherits unless it says otherwise: it trains on stored features only, its model computes its own
    loss, and text tasks read GPT-2 tokens as the heads' prompts and answers."""

    trains_from_pixels: ClassVar[bool] = False  # whether inputs "pixels" can train it (its model holds its encoder)
    trains_from_features: ClassVar[bool] = True  # whether stored features can train it
    image_processor = None  # inputs "pixels": the encoder's own, which prepares the images of `examples`

    def prepare_images_as(self, folder: str) -> None:
        """Image examples (`examples(rows, None, root)`) prepared by the image processor saved in the model `folder`
        (a model that holds its encoder): what `lapvqa evaluate` without features reads the images with."""
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(folder)
        except OSError as error:
            raise OSError(f"{folder} has no image processor to prepare the images ({first_line(error)}).") from None

    @classmethod
    def from_config(cls, config: TrainConfig) -> "TaskDefaults":
        """The task of a training config (a task without options of its own: the same for every config)."""
        return cls()

    @classmethod
    def from_model_config(cls, model_config) -> "TaskDefaults":
        """The task of a saved model's config, for `lapvqa evaluate`."""
        return cls()

    def feature_image_processor(self, recipe: EncoderRecipe, checkpoint: str | None = None):
        """How `lapvqa extract-features` prepares images for this task: the encoder's own processor."""
        return load_encoder_image_processor(recipe, checkpoint)

    def tokenizer(self, model: PreTrainedModel) -> PreTrainedTokenizerBase | None:
        """The tokenizer of the training texts, sized to the model's learned positions; None: no text."""
        if not self.generates_text:
            return None
        return build_gpt2_tokenizer(getattr(model.config, "max_position_embeddings", 200))

    def training_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The loss of one training batch: the model's own."""
        return model(**batch).loss

    @classmethod
    def pixel_input_problems(cls, values: dict) -> list[str]:
        """What in training config `values` keeps inputs "pixels" from working for this task (one line each)."""
        return []


class TrainingTask(Protocol):
    """What `train` and `lapvqa evaluate` need of a task (`TaskDefaults` gives the usual answers)."""

    name: ClassVar[str]
    model_class: ClassVar[type[PreTrainedModel]]
    options_class: ClassVar[type | None]  # the task's own config fields (a dataclass), or None
    derived_fields: ClassVar[tuple[str, ...]]  # model config fields set from the features, not by the user
    group_label: ClassVar[str]  # what the per-group scores are grouped by
    metrics: ClassVar[tuple[str, ...]]
    generates_text: ClassVar[bool]
    image_preparation: ClassVar[str]  # how the images of its features were prepared (recorded with them)
    trains_from_pixels: ClassVar[bool]
    trains_from_features: ClassVar[bool]

    @classmethod
    def pixel_input_problems(cls, values: dict) -> list[str]: ...
    def tokenizer(self, model: PreTrainedModel) -> PreTrainedTokenizerBase | None: ...
    def training_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor: ...

    @classmethod
    def from_config(cls, config: TrainConfig) -> "TrainingTask": ...
    @classmethod
    def from_model_config(cls, model_config) -> "TrainingTask": ...
    def load_splits(self, data_root: str | Path) -> DatasetDict: ...
    def examples(self, rows, features: FeatureStore, root: Path) -> torch.utils.data.Dataset: ...
    def feature_width(self, model: PreTrainedModel) -> int: ...
    def feature_image_processor(self, recipe: EncoderRecipe, checkpoint: str | None = None): ...
    def build_model(self, config: TrainConfig, features: FeatureStore) -> PreTrainedModel: ...
    def collate(self, tokenizer, max_positions: int | None) -> Callable[[list[dict]], dict]: ...
    def predict(self, model, tokenizer, dataset, batch_size: int, max_new_tokens: int) -> list: ...
    def references(self, dataset) -> list: ...
    def score(self, predictions: list, dataset) -> dict[str, dict[str, float]]: ...
    def save(self, model: PreTrainedModel, tokenizer, features: FeatureStore, target: Path) -> None: ...


# --- what the tasks share ---------------------------------------------------------------------------------------


def _right_padded(sequences: list[list[int]], labels: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Token sequences and their labels, right-padded (pad ids, mask 0, label -100)."""
    width = max(len(s) for s in sequences)
    return {
        "input_ids": torch.tensor([s + [pad_token_id] * (width - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


def require_features(features: FeatureStore, ids: list[str]) -> None:
    """Checks that every image of a split has stored features, before any training or generation starts."""
    missing = sorted({i for i in ids if i not in features})
    if missing:
        raise FeatureError(
            f"{features.output_dir} has no features for {len(missing)} image(s) of the data, e.g. {missing[0]!r}; "
            "extract them with `lapvqa extract-features` (it adds the missing ones)."
        )


@torch.no_grad()
def _generate_split(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    max_new_tokens: int,
    inputs_of: Callable[[list[dict]], dict[str, torch.Tensor]],
) -> list[str]:
    """Greedy continuations of `inputs_of(examples)` (prompt + visual inputs) for every example, decoded."""
    texts = []
    for start in range(0, len(dataset), batch_size):
        examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        inputs = {key: value.to(model.device) for key, value in inputs_of(examples).items()}
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts += tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in texts]


def predict_across_processes(
    task: TrainingTask,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    max_new_tokens: int,
) -> list:
    """`task.predict` for every example of `dataset`, shared among the processes (process R of W predicts examples
    R, R+W, ...) and gathered, in the dataset's order, on every process."""
    state = PartialState()
    indices = list(range(state.process_index, len(dataset), state.num_processes))
    predictions = task.predict(model, tokenizer, Subset(dataset, indices), batch_size, max_new_tokens)
    gathered = gather_object(list(zip(indices, predictions, strict=True)))
    return [prediction for _, prediction in sorted(gathered, key=lambda pair: pair[0])]


def batch_tokens(batch: dict) -> torch.Tensor:
    """The tokens a training batch feeds the model (for tokens/s): its text tokens, or its visual tokens (detection)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return torch.tensor(batch["image_features"].shape[:2].numel(), device=batch["image_features"].device)


# --- DiffVQA ----------------------------------------------------------------------------------------------------


def require_questions(rows: list[dict]) -> None:
    """Every row must ask a question: refused now, not by the prompt builder in the middle of training."""
    empty = [i for i, row in enumerate(rows) if not isinstance(row["question"], str) or not row["question"].strip()]
    if empty:
        raise DataError(
            f"{len(empty)} row(s) of the data have no question, e.g. row {empty[0]} (images "
            f"{rows[empty[0]]['prior_image']}, {rows[empty[0]]['current_image']}); remove or fill them."
        )


class DiffVQAExamples(torch.utils.data.Dataset):
    """Rows of a split with their stored features: (prior and current image features, question, answer, question type)."""

    def __init__(self, rows, features: FeatureStore, root: Path):
        self.rows = list(rows)
        self.features = features
        self.ids = [(image_id(row["prior_image"], root), image_id(row["current_image"], root)) for row in self.rows]
        require_features(features, [i for pair in self.ids for i in pair])
        require_questions(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        prior_id, current_id = self.ids[index]
        return {
            "prior_image_features": self.features[prior_id].float(),
            "current_image_features": self.features[current_id].float(),
            "question": row["question"],
            "answer": row["answer"],
            "question_type": row["question_type"],
        }


# What examples give the model of their images: stored features, or images prepared for the encoder it holds.
VISUAL_INPUTS = (
    "image_features",
    "pixel_values",
    "prior_image_features",
    "current_image_features",
    "prior_pixel_values",
    "current_pixel_values",
)


def _visual_inputs(examples: list[dict]) -> dict[str, torch.Tensor]:
    """The examples' stored features (`image_features`, `prior_/current_image_features`) or prepared images
    (`pixel_values`, `prior_/current_pixel_values`), stacked."""
    return {key: torch.stack([e[key] for e in examples]) for key in VISUAL_INPUTS if key in examples[0]}


def image_paths(rows: list[dict], columns: tuple[str, ...]) -> list[list[str]]:
    """The image files each row names in `columns` (absolute, as the loaders give them); refused in one line if any
    does not exist."""
    paths = [[os.path.abspath(row[column]) for column in columns] for row in rows]
    missing = [path for row_paths in paths for path in row_paths if not Path(path).is_file()]
    if missing:
        raise DataError(f"{len(missing)} image(s) of the data do not exist, e.g. {missing[0]}; fix data_root.")
    return paths


def prepared_images(paths: list[str], image_processor) -> torch.Tensor:
    """X-ray files read (16-bit, DICOM) and prepared by the encoder's own processor: `[len(paths), C, H, W]`; an image
    that cannot be read stops training with an error naming it."""
    try:
        return LapvqaImageProcessor().encoder_pixel_values(paths, image_processor)
    except (ValueError, OSError) as error:
        raise DataError(f"{', '.join(paths)}: cannot be read ({first_line(error)}); fix or remove it.") from None


class DiffVQAImageExamples(DiffVQAExamples):
    """Rows of a split with both images, read and prepared when taken (inputs "pixels", the encoder in the loop):
    (prior and current pixel values, question, answer, question type)."""

    def __init__(self, rows, image_processor):
        self.rows = list(rows)
        self.paths = image_paths(self.rows, ("prior_image", "current_image"))
        require_questions(self.rows)
        self.image_processor = image_processor

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        prior, current = prepared_images(self.paths[index], self.image_processor)
        return {
            "prior_pixel_values": prior,
            "current_pixel_values": current,
            "question": row["question"],
            "answer": row["answer"],
            "question_type": row["question_type"],
        }


def training_collate(tokenizer, max_positions: int):
    """question + [bos] + answer + [eos], right-padded; labels only on the answer and its eos."""

    def collate(examples: list[dict]) -> dict:
        eos = tokenizer.eos_token_id
        sequences, labels = [], []
        for example in examples:
            prompt = question_prompt(tokenizer, example["question"])  # question + [bos]
            answer = tokenizer(example["answer"], add_special_tokens=False)["input_ids"]
            sequences.append((prompt + answer + [eos])[:max_positions])
            labels.append(([-100] * len(prompt) + answer + [eos])[:max_positions])
        return {**_right_padded(sequences, labels, eos), **_visual_inputs(examples)}

    return collate


def answer_split(model, tokenizer, dataset: DiffVQAExamples, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers for every row of `dataset`."""

    def inputs_of(examples: list[dict]) -> dict[str, torch.Tensor]:
        return {**encode_questions(tokenizer, [e["question"] for e in examples]), **_visual_inputs(examples)}

    return _generate_split(model, tokenizer, dataset, batch_size, max_new_tokens, inputs_of)


class HeldEncoderTraining(TaskDefaults):
    """Inputs "pixels" for the heads fed by an encoder's patch tokens (DiffVQA, report generation): the model holds
    the encoder (`vision_model`: the recipe `encoder` from `encoder_checkpoint`, or the one `init_from`'s folder
    holds or records), frozen or, with `train_encoder`, fine-tuned end to end with the head (the "native" recipe).
    The saved folder holds that encoder and its image processor, so that it runs from images as it is."""

    options_class = HeldEncoderOptions
    trains_from_pixels = True

    def __init__(self, options: HeldEncoderOptions | None = None):
        self.options = options or HeldEncoderOptions()

    @classmethod
    def from_config(cls, config: TrainConfig) -> "HeldEncoderTraining":
        return cls(config.options(HeldEncoderOptions))

    @classmethod
    def pixel_input_problems(cls, values: dict) -> list[str]:
        if values.get("init_from") or values.get("encoder"):
            return []
        return [
            "inputs=pixels: name the encoder the head learns with (encoder, one of "
            f"{', '.join(RECIPES)}) or a head to start from (init_from)."
        ]

    def head_with_its_encoder(self, config: TrainConfig, new_head: Callable[[EncoderRecipe], PreTrainedModel]):
        """The head (`init_from`'s, else `new_head(recipe)`) holding its encoder, which is frozen unless
        `train_encoder`."""
        options = self.options
        if config.init_from:
            model = load_model(self.model_class, config.init_from)
            recorded = (model.config.feature_recipe or {}).get("name")
            if options.encoder is not None and options.encoder != recorded:
                raise ValueError(
                    f"encoder={options.encoder!r}, but {config.init_from} is a head on {recorded or 'no named'} "
                    "features; remove encoder (the head's own is used) or start without init_from."
                )
        else:
            model = new_head(RECIPES[options.encoder])
        if model.vision_model is not None:  # the folder holds its encoder, and the processor beside it
            self.prepare_images_as(config.init_from)
        else:
            recipe = EncoderRecipe(**model.config.feature_recipe)
            if options.encoder_checkpoint:
                recipe = dataclasses.replace(recipe, checkpoint=options.encoder_checkpoint, revision=None)
            model.vision_model = load_encoder(recipe)
            model.config.feature_recipe = dataclasses.asdict(recipe)
            model.config.encoder_config = model.vision_model.config.to_dict()
            self.image_processor = load_encoder_image_processor(recipe)
        model.vision_model.requires_grad_(config.train_encoder)
        model.config.encoder_finetuned = bool(model.config.encoder_finetuned or config.train_encoder)
        return model

    def save(self, model: PreTrainedModel, tokenizer, features: FeatureStore | None, target: Path) -> None:
        """The head (with the encoder it holds, inputs "pixels", and that encoder's image processor) and its
        tokenizer."""
        save_pretrained_with_pipeline(model, target)
        tokenizer.save_pretrained(target)
        if features is None:
            self.image_processor.save_pretrained(target)


def new_head_config(config_class, recipe: EncoderRecipe, overrides: dict):
    """A new head's config on `recipe`'s patch tokens, with the user's `model` overrides."""
    return config_class(
        vis_dim=recipe.vis_dim,
        encoder_name=registered_encoder_name(recipe),
        feature_recipe=dataclasses.asdict(recipe),
        **overrides,
    )


class DiffVQATask(HeldEncoderTraining):
    """A DiffVQA head on MIMIC-Diff-VQA questions about (prior, current) pairs, scored per question type: on stored
    features of its frozen encoder, or on images with the encoder it holds (`HeldEncoderTraining`)."""

    name = "diffvqa"
    model_class = LapvqaDiffVQAModel
    image_preparation = IMAGE_PREPARATION  # the encoder's own processor
    # model config fields set from the features or the encoder
    derived_fields = ("vis_dim", "encoder_name", "feature_recipe", "encoder_config", "encoder_finetuned")
    group_label = "question type"
    metrics = TEXT_METRICS
    generates_text = True

    def load_splits(self, data_root: str | Path) -> DatasetDict:
        return load_mimic_diff_vqa(data_root)

    def examples(self, rows, features: FeatureStore | None, root: Path) -> DiffVQAExamples:
        if features is None:  # inputs "pixels"
            return DiffVQAImageExamples(rows, self.image_processor)
        require_image_preparation(features, self.image_preparation)
        return DiffVQAExamples(rows, features, root)

    def feature_width(self, model: LapvqaDiffVQAModel) -> int:
        return model.config.vis_dim

    def build_model(self, config: TrainConfig, features: FeatureStore | None) -> LapvqaDiffVQAModel:
        if features is None:
            new_head = lambda recipe: LapvqaDiffVQAModel(new_head_config(LapvqaDiffVQAConfig, recipe, config.model))  # noqa: E731
            return self.head_with_its_encoder(config, new_head)
        if config.init_from:
            return model_to_init_from(self, config.init_from, features)
        return LapvqaDiffVQAModel(new_head_config(LapvqaDiffVQAConfig, features.recipe, config.model))

    def collate(self, tokenizer, max_positions: int) -> Callable[[list[dict]], dict]:
        return training_collate(tokenizer, max_positions)

    def predict(self, model, tokenizer, dataset: DiffVQAExamples, batch_size: int, max_new_tokens: int) -> list[str]:
        return answer_split(model, tokenizer, dataset, batch_size, max_new_tokens)

    def references(self, dataset: DiffVQAExamples) -> list[str]:
        return [row["answer"] for row in dataset.rows]

    def score(self, predictions: list[str], dataset: DiffVQAExamples) -> dict[str, dict[str, float]]:
        return score_answers(predictions, self.references(dataset), [row["question_type"] for row in dataset.rows])


# --- captioning -------------------------------------------------------------------------------------------------


class OneImageExamples(torch.utils.data.Dataset):
    """Rows of a split that each name one image (`row["image"]`), with its stored features."""

    def __init__(self, rows, features: FeatureStore, root: Path):
        self.rows = list(rows)
        self.features = features
        self.ids = [image_id(row["image"], root) for row in self.rows]
        require_features(features, self.ids)

    def __len__(self) -> int:
        return len(self.rows)


class ReportExamples(OneImageExamples):
    """Rows of a split with the stored features of their image: (image_features, report)."""

    def __getitem__(self, index: int) -> dict:
        return {"image_features": self.features[self.ids[index]].float(), "report": self.rows[index]["report"]}


class ReportImageExamples(torch.utils.data.Dataset):
    """Rows of a split with their image, read and prepared when taken (inputs "pixels"): (pixel_values, report).
    An image that cannot be read stops training with an error naming it."""

    def __init__(self, rows, image_processor):
        self.rows = list(rows)
        self.paths = image_paths(self.rows, ("image",))
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        (pixels,) = prepared_images(self.paths[index], self.image_processor)
        return {"pixel_values": pixels, "report": self.rows[index]["report"]}


def report_collate(tokenizer, max_positions: int):
    """[bos] + report + [eos] (cut to the model's positions), right-padded; labels on the report and its eos."""

    def collate(examples: list[dict]) -> dict:
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        sequences = [
            ([bos] + tokenizer(e["report"], add_special_tokens=False)["input_ids"] + [eos])[:max_positions]
            for e in examples
        ]
        # Labels are aligned with the inputs and shifted inside the loss: bos is never a target.
        return {**_right_padded(sequences, sequences, eos), **_visual_inputs(examples)}

    return collate


def report_split(model, tokenizer, dataset: ReportExamples, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy reports, from `[bos]`, for every image of `dataset`."""

    def inputs_of(examples: list[dict]) -> dict[str, torch.Tensor]:
        bos = torch.full((len(examples), 1), tokenizer.bos_token_id)
        return {"input_ids": bos, "attention_mask": torch.ones_like(bos), **_visual_inputs(examples)}

    return _generate_split(model, tokenizer, dataset, batch_size, max_new_tokens, inputs_of)


class CaptioningTask(TaskDefaults):
    """`LapvqaCaptioningModel` on MIMIC-CXR reports.

    On stored features (inputs "features"), the model trains without its `vision_model` (frozen, never run: the
    features are its output); the encoder the features were extracted with (`vision_encoder`) is loaded once, on the
    CPU, when the best model is saved. On images (inputs "pixels"), the encoder (from `init_from`, else
    `vision_encoder`) runs in the loop, frozen or, with `train_encoder`, trained, and is saved with the decoder.
    """

    name = "captioning"
    model_class = LapvqaCaptioningModel
    options_class = CaptioningOptions
    trains_from_pixels = True
    image_preparation = IMAGE_PREPARATION
    derived_fields = ("vision_config", "feature_recipe")  # model config fields set from the features' encoder
    group_label = "reports"
    metrics = TEXT_METRICS
    generates_text = True

    def __init__(self, options: CaptioningOptions | None = None):
        options = options or CaptioningOptions()
        if not options.report_sections:
            raise ValueError(f"report_sections is empty; name the report sections to learn, e.g. {REPORT_SECTIONS}.")
        self.report_sections = list(options.report_sections)
        self.vision_encoder = options.vision_encoder
        self._encoder: LapvqaVisionModel | None = None

    @classmethod
    def pixel_input_problems(cls, values: dict) -> list[str]:
        if values.get("init_from") or values.get("vision_encoder"):
            return []
        return ["inputs=pixels: name the encoder to train from: vision_encoder (a LapvqaVisionModel) or init_from."]

    @classmethod
    def from_config(cls, config: TrainConfig) -> "CaptioningTask":
        return cls(config.options(CaptioningOptions))

    @classmethod
    def from_model_config(cls, model_config) -> "CaptioningTask":
        return cls(CaptioningOptions(report_sections=model_config.report_sections or list(REPORT_SECTIONS)))

    def load_splits(self, data_root: str | Path) -> DatasetDict:
        return load_mimic_cxr_reports(data_root, sections=self.report_sections)

    def examples(self, rows, features: FeatureStore | None, root: Path) -> ReportExamples | ReportImageExamples:
        if features is None:  # inputs "pixels"
            return ReportImageExamples(rows, self.image_processor)
        require_image_preparation(features, self.image_preparation)
        return ReportExamples(rows, features, root)

    def feature_width(self, model: LapvqaCaptioningModel) -> int:
        return model.config.vision_config.hidden_size

    def _encoder_config(self, features: FeatureStore) -> LapvqaVisionConfig:
        """The config of the encoder that made the features; checks that it is a `LapvqaVisionModel` that fits them."""
        recipe = features.recipe
        if recipe.library != "lapvqa":
            raise FeatureError(
                f"{features.output_dir} holds {recipe.name} features, but the captioning model's encoder is a "
                "LapvqaVisionModel: extract features with `lapvqa extract-features --encoder lapvqa-vit-l14`."
            )
        self.vision_encoder = self.vision_encoder or recipe.checkpoint
        try:
            encoder_config = LapvqaVisionConfig.from_pretrained(self.vision_encoder)
        except OSError as error:
            raise OSError(
                f"Cannot load the encoder the features were extracted with ({self.vision_encoder}): {error} Set "
                "`vision_encoder` to that LapvqaVisionModel's folder or Hub id."
            ) from None
        found = (encoder_config.hidden_size, encoder_config.image_size)
        if found != (recipe.vis_dim, recipe.image_size):
            raise FeatureError(
                f"{self.vision_encoder} gives {found[0]}-dim tokens of {found[1]} px images, but the features in "
                f"{features.output_dir} are {recipe.vis_dim}-dim tokens of {recipe.image_size} px images; set "
                "`vision_encoder` to the encoder they were extracted with."
            )
        return encoder_config

    def build_model(self, config: TrainConfig, features: FeatureStore | None) -> LapvqaCaptioningModel:
        if features is None:
            model = self._model_with_its_encoder(config)
        else:
            model = self._decoder_on_features(config, features)
        if config.eval_max_new_tokens > model.config.max_position_embeddings:
            raise ValueError(
                f"eval_max_new_tokens={config.eval_max_new_tokens} exceeds the model's "
                f"{model.config.max_position_embeddings} learned positions; lower it."
            )
        model.config.report_sections = self.report_sections  # what `lapvqa evaluate` scores against
        return model

    def _model_with_its_encoder(self, config: TrainConfig) -> LapvqaCaptioningModel:
        """Inputs "pixels": the whole model, its encoder frozen unless `train_encoder`, with the encoder's own image
        processor for the images."""
        source = config.init_from or self.vision_encoder
        if config.init_from:
            model = load_model(LapvqaCaptioningModel, config.init_from)
        else:
            try:
                encoder = LapvqaVisionModel.from_pretrained(self.vision_encoder)
            except OSError as error:
                raise OSError(
                    f"Cannot load the encoder {self.vision_encoder} ({first_line(error)}); set `vision_encoder` to a "
                    "LapvqaVisionModel's folder or Hub id."
                ) from None
            model = LapvqaCaptioningModel(LapvqaCaptioningConfig(vision_config=encoder.config, **config.model))
            model.vision_model.load_state_dict(encoder.state_dict())
        self.prepare_images_as(source)
        model.vision_model.requires_grad_(config.train_encoder)
        return model

    def _decoder_on_features(self, config: TrainConfig, features: FeatureStore) -> LapvqaCaptioningModel:
        encoder_config = self._encoder_config(features)
        if config.init_from:
            model = model_to_init_from(self, config.init_from, features)
        else:
            model = LapvqaCaptioningModel(LapvqaCaptioningConfig(vision_config=encoder_config, **config.model))
        model.config.vision_config = encoder_config
        model.vision_model = None  # trained on its stored output: no encoder in the optimizer or the checkpoints
        return model

    def collate(self, tokenizer, max_positions: int) -> Callable[[list[dict]], dict]:
        return report_collate(tokenizer, max_positions)

    def predict(self, model, tokenizer, dataset: ReportExamples, batch_size: int, max_new_tokens: int) -> list[str]:
        return report_split(model, tokenizer, dataset, batch_size, max_new_tokens)

    def references(self, dataset: ReportExamples) -> list[str]:
        return [row["report"] for row in dataset.rows]

    def score(self, predictions: list[str], dataset: ReportExamples) -> dict[str, dict[str, float]]:
        return score_answers(predictions, self.references(dataset))

    def save(self, model: LapvqaCaptioningModel, tokenizer, features: FeatureStore | None, target: Path) -> None:
        """The whole captioning model (decoder + the features' encoder, or its own trained one) with the processor
        of its encoder."""
        if features is None:  # inputs "pixels": the model holds its encoder
            save_pretrained_with_pipeline(model, target)
            LapvqaProcessor(self.image_processor, tokenizer).save_pretrained(target)
            return
        if self._encoder is None:
            self._encoder = LapvqaVisionModel.from_pretrained(self.vision_encoder).eval()
        model.vision_model = self._encoder.to(model.device)
        try:
            save_pretrained_with_pipeline(model, target)
        finally:
            model.vision_model = None
            self._encoder.to("cpu")
        # The encoder's own image processor, so that the model reports from pixels as it learned from the features.
        image_processor = load_encoder_image_processor(features.recipe, self.vision_encoder)
        LapvqaProcessor(image_processor, tokenizer).save_pretrained(target)


# --- report generation ------------------------------------------------------------------------------------------


class ReportGenerationTask(HeldEncoderTraining):
    """A report-generation head (`LapvqaReportGenerationModel`) on MIMIC-CXR reports (FINDINGS + IMPRESSION), from
    stored features of its frozen encoder: `[bos] + report + [eos]`, the loss on the report and its eos. Scored by
    BLEU-1..4, ROUGE and CIDEr, and RadGraph-F1 (`radgraph_f1`) where the optional `radgraph` package is installed.
    On stored features the saved head runs with the encoder its features were extracted with (`feature_recipe`), so
    it is not `encoder_finetuned`, whatever it was initialised from; on images it holds its encoder
    (`HeldEncoderTraining`), fine-tuned with `train_encoder`."""

    name = "report-generation"
    model_class = LapvqaReportGenerationModel
    image_preparation = IMAGE_PREPARATION  # the encoder's own processor
    derived_fields = ("vis_dim", "encoder_name", "feature_recipe", "encoder_config", "encoder_finetuned")
    group_label = "reports"
    metrics = TEXT_METRICS
    generates_text = True

    def load_splits(self, data_root: str | Path) -> DatasetDict:
        return load_mimic_cxr_reports(data_root)

    def examples(self, rows, features: FeatureStore | None, root: Path) -> ReportExamples | ReportImageExamples:
        if features is None:  # inputs "pixels"
            return ReportImageExamples(rows, self.image_processor)
        require_image_preparation(features, self.image_preparation)
        return ReportExamples(rows, features, root)

    def feature_width(self, model: LapvqaReportGenerationModel) -> int:
        return model.config.vis_dim

    def build_model(self, config: TrainConfig, features: FeatureStore | None) -> LapvqaReportGenerationModel:
        config_class = LapvqaReportGenerationConfig
        if features is None:
            new_head = lambda recipe: LapvqaReportGenerationModel(new_head_config(config_class, recipe, config.model))  # noqa: E731
            model = self.head_with_its_encoder(config, new_head)
        elif config.init_from:
            model = model_to_init_from(self, config.init_from, features)
            model.config.encoder_finetuned = False  # it learns the features' encoder, recorded as its feature_recipe
        else:
            model = LapvqaReportGenerationModel(new_head_config(config_class, features.recipe, config.model))
        if config.eval_max_new_tokens > model.config.max_position_embeddings:
            raise ValueError(
                f"eval_max_new_tokens={config.eval_max_new_tokens} exceeds the model's "
                f"{model.config.max_position_embeddings} learned positions; lower it."
            )
        return model

    def collate(self, tokenizer, max_positions: int) -> Callable[[list[dict]], dict]:
        return report_collate(tokenizer, max_positions)

    def predict(self, model, tokenizer, dataset: ReportExamples, batch_size: int, max_new_tokens: int) -> list[str]:
        return report_split(model, tokenizer, dataset, batch_size, max_new_tokens)

    def references(self, dataset: ReportExamples) -> list[str]:
        return [row["report"] for row in dataset.rows]

    def score(self, predictions: list[str], dataset: ReportExamples) -> dict[str, dict[str, float]]:
        references = self.references(dataset)
        scores = score_answers(predictions, references)
        if importlib.util.find_spec("radgraph") is not None:  # the upstream cards' RadGraph-F1, where installed
            scores["overall"]["radgraph_f1"] = radgraph_f1(predictions, references)
        return scores


# --- detection --------------------------------------------------------------------------------------------------


class DetectionExamples(OneImageExamples):
    """Images of a split with their stored features and boxes: (image_features, class_labels, boxes)."""

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "image_features": self.features[self.ids[index]].float(),
            "class_labels": torch.tensor(row["class_labels"], dtype=torch.long),
            "boxes": torch.tensor(row["boxes"], dtype=torch.float32).reshape(-1, 4),
        }


def detection_collate(examples: list[dict]) -> dict:
    """Stacked features and transformers' DETR `labels`: a dict of `class_labels` and `boxes` per image."""
    return {
        "image_features": torch.stack([e["image_features"] for e in examples]),
        "labels": [{"class_labels": e["class_labels"], "boxes": e["boxes"]} for e in examples],
    }


@torch.no_grad()
def detect_split(model: LapvqaDetectionModel, dataset: DetectionExamples, batch_size: int) -> list[dict]:
    """Every query's detection for every image of `dataset`, as DETR is evaluated: its most likely class (not
    no-object) and that class's probability, and its box (x0, y0, x1, y1) normalised to the image."""
    post_processor = LapvqaImageProcessor()  # without target sizes, its post-processing keeps boxes normalised
    detections = []
    for start in range(0, len(dataset), batch_size):
        examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        outputs = model(image_features=torch.stack([e["image_features"] for e in examples]).to(model.device))
        for found in post_processor.post_process_object_detection(outputs, threshold=0.0):
            detections.append({key: found[key].tolist() for key in ("boxes", "scores", "labels")})
    return detections


def corners(boxes: list[list[float]]) -> list[list[float]]:
    """(cx, cy, w, h) boxes -> (x0, y0, x1, y1)."""
    return [[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2] for cx, cy, w, h in boxes]


class DetectionTask(TaskDefaults):
    """A DETR-style detection head (`LapvqaDetectionModel`) on VinDr-CXR boxes, scored by mAP at IoU 0.4 and 0.5
    overall and per class. The radiologists' boxes are combined by `radiologists` (`lapvqa_hf.detection_data`), for
    the training targets and the validation ground truth alike."""

    name = "detection"
    model_class = LapvqaDetectionModel
    options_class = DetectionOptions
    image_preparation = DETECTION_IMAGE_PREPARATION  # the detection head's own processor (stretched: boxes fit)
    derived_fields = ("vis_dim", "encoder_name", "feature_recipe")  # model config fields set from the features
    group_label = "class"
    metrics = DETECTION_METRICS
    generates_text = False

    def __init__(
        self, options: DetectionOptions | None = None, classes: list[str] | tuple[str, ...] = VINDR_CXR_CLASSES
    ):
        self.radiologists = (options or DetectionOptions()).radiologists
        self.classes = list(classes)  # the model's, once it is built

    @classmethod
    def from_config(cls, config: TrainConfig) -> "DetectionTask":
        return cls(config.options(DetectionOptions))

    @classmethod
    def from_model_config(cls, model_config) -> "DetectionTask":
        classes = [model_config.id2label[index] for index in range(model_config.num_labels)]
        return cls(DetectionOptions(radiologists=model_config.radiologists or "fused"), classes)

    def load_splits(self, data_root: str | Path) -> DatasetDict:
        return load_vindr_cxr(data_root, radiologists=self.radiologists, classes=self.classes)

    def examples(self, rows, features: FeatureStore, root: Path) -> DetectionExamples:
        require_image_preparation(features, self.image_preparation)
        return DetectionExamples(rows, features, root)

    def feature_width(self, model: LapvqaDetectionModel) -> int:
        return model.config.vis_dim

    def feature_image_processor(self, recipe: EncoderRecipe, checkpoint: str | None = None):
        """How `lapvqa extract-features` prepares images for this task: as the detection head's own image processor
        does (stretched to the encoder's size, so that the boxes map back)."""
        return detection_image_processor(recipe)

    def build_model(self, config: TrainConfig, features: FeatureStore) -> LapvqaDetectionModel:
        recipe = features.recipe
        if config.init_from:
            model = model_to_init_from(self, config.init_from, features)
        else:
            model = LapvqaDetectionModel(
                LapvqaDetectionConfig(
                    vis_dim=recipe.vis_dim, encoder_name=registered_encoder_name(recipe), **config.model
                )
            )
        self.classes = [model.config.id2label[index] for index in range(model.config.num_labels)]
        model.config.radiologists = self.radiologists  # what `lapvqa evaluate` scores against
        return model

    def collate(self, tokenizer, max_positions: int | None) -> Callable[[list[dict]], dict]:
        return detection_collate

    def predict(self, model, tokenizer, dataset: DetectionExamples, batch_size: int, max_new_tokens: int) -> list[dict]:
        return detect_split(model, dataset, batch_size)

    def references(self, dataset: DetectionExamples) -> list[dict]:
        return [{"boxes": corners(row["boxes"]), "labels": row["class_labels"]} for row in dataset.rows]

    def score(self, predictions: list[dict], dataset: DetectionExamples) -> dict[str, dict[str, float]]:
        return score_detections(predictions, self.references(dataset), dict(enumerate(self.classes)))

    def save(self, model: LapvqaDetectionModel, tokenizer, features: FeatureStore, target: Path) -> None:
        """The model with the image processor its features were prepared by, so that it detects from pixels."""
        save_pretrained_with_pipeline(model, target)
        detection_image_processor(features.recipe).save_pretrained(target)


# --- two-tower pretraining --------------------------------------------------------------------------------------


class _GatherWithGradients(torch.autograd.Function):
    """All processes' rows of a tensor, concatenated in process order, through which gradients flow back to each
    process's own rows: the backward sums every process's gradient of the gathered tensor, then keeps its own slice
    (as open_clip's `gather_with_grad`)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        ctx.rows, ctx.rank = len(tensor), rank
        parts = [torch.empty_like(tensor) for _ in range(world)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_gradients(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s rows from every process (every process's batch has the same size), differentiable; the tensor
    itself in a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    if torch.distributed.get_world_size() == 1:
        return tensor
    return _GatherWithGradients.apply(tensor)


class TwoTowerTask(TaskDefaults):
    """`LapvqaTwoTowerModel` on MIMIC-CXR image/report pairs, from images (both towers run), scored by Recall@1/5/10
    both ways on the validation split.

    The loss is the one the model's weights select (pairwise sigmoid with `logit_bias`, else the symmetric
    cross-entropy) over the *global* batch: every process's embeddings are gathered, with gradients, so that each
    image meets every report of the step as negatives, and N processes of batch B train as one process of batch
    N x B. The image tower trains with `train_encoder`, else it stays frozen (the report tower and both projections
    train); `init_from` starts from a converted or trained two-tower folder, else `model` sizes a new one.
    """

    name = "two-tower"
    model_class = LapvqaTwoTowerModel
    options_class = None
    trains_from_pixels = True
    trains_from_features = False
    image_preparation = IMAGE_PREPARATION
    derived_fields = ()
    group_label = "pairs"
    metrics = RETRIEVAL_METRICS
    generates_text = False

    def load_splits(self, data_root: str | Path) -> DatasetDict:
        return load_mimic_cxr_reports(data_root)

    def examples(self, rows, features: FeatureStore | None, root: Path) -> ReportImageExamples:
        return ReportImageExamples(rows, self.image_processor)

    def feature_width(self, model: LapvqaTwoTowerModel) -> int:
        return model.config.vision_config.hidden_size

    def build_model(self, config: TrainConfig, features: FeatureStore | None) -> LapvqaTwoTowerModel:
        if config.init_from:
            model = load_model(LapvqaTwoTowerModel, config.init_from)
            self.prepare_images_as(config.init_from)
        else:
            model = LapvqaTwoTowerModel(LapvqaTwoTowerConfig(**config.model))
            self.image_processor = LapvqaImageProcessor.for_encoder(model.config.vision_config)
        model.vision_model.requires_grad_(config.train_encoder)
        return model

    def tokenizer(self, model: LapvqaTwoTowerModel) -> PreTrainedTokenizerBase:
        """GPT-2 tokens + eot, right-padded, cut to the report tower's positions."""
        return build_gpt2_tokenizer(model.config.text_config.max_position_embeddings, append_eot=True)

    def collate(self, tokenizer, max_positions: int | None) -> Callable[[list[dict]], dict]:
        def collate(examples: list[dict]) -> dict:
            texts = tokenizer([e["report"] for e in examples], padding=True, truncation=True, return_tensors="pt")
            return {**texts, **_visual_inputs(examples)}

        return collate

    def training_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The loss over the global batch: the step's embeddings of every process, gathered with gradients."""
        outputs = model(**batch)
        images = gather_with_gradients(outputs.image_embeds.float())
        reports = gather_with_gradients(outputs.text_embeds.float())
        two_tower = extract_model_from_parallel(model)
        logits_per_report = two_tower.similarity(images, reports).T
        return (
            sigmoid_loss(logits_per_report) if two_tower.logit_bias is not None else contrastive_loss(logits_per_report)
        )

    @torch.no_grad()
    def predict(self, model, tokenizer, dataset, batch_size: int, max_new_tokens: int) -> list[dict]:
        """Each pair's image and report embeddings (projected, normalised), as lists."""
        collate = self.collate(tokenizer, None)
        embeddings = []
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            outputs = model(**{key: value.to(model.device) for key, value in batch.items()})
            for image, report in zip(outputs.image_embeds.float(), outputs.text_embeds.float(), strict=True):
                embeddings.append({"image": image.tolist(), "report": report.tolist()})
        return embeddings

    def references(self, dataset) -> list[str]:
        return [row["report"] for row in dataset.rows]

    def score(self, predictions: list[dict], dataset) -> dict[str, dict[str, float]]:
        images = torch.tensor([p["image"] for p in predictions])
        reports = torch.tensor([p["report"] for p in predictions])
        return score_retrieval(images, reports)

    def save(self, model: LapvqaTwoTowerModel, tokenizer, features: FeatureStore | None, target: Path) -> None:
        save_pretrained_with_pipeline(model, target)
        LapvqaTwoTowerProcessor(self.image_processor, tokenizer).save_pretrained(target)


# --- phrase grounding -------------------------------------------------------------------------------------------


class GroundingExamples(OneImageExamples):
    """(image, phrase) examples of a split: the stored features of the image, the phrase's text features (computed
    once per phrase, `phrase_features`) and the target box: (image_features, text_features, labels)."""

    def __init__(self, rows, features: FeatureStore, root: Path, phrase_features: dict[str, torch.Tensor]):
        super().__init__(rows, features, root)
        self.phrase_features = phrase_features

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "image_features": self.features[self.ids[index]].float(),
            "text_features": self.phrase_features[row["phrase"]],
            "labels": torch.tensor(row["box"], dtype=torch.float32),
        }


def grounding_collate(examples: list[dict]) -> dict:
    """Stacked features, phrase features and target boxes (cx, cy, w, h)."""
    return {key: torch.stack([e[key] for e in examples]) for key in ("image_features", "text_features", "labels")}


@torch.no_grad()
def ground_split(model: LapvqaGroundingModel, dataset: GroundingExamples, batch_size: int) -> list[list[float]]:
    """Each example's predicted box (cx, cy, w, h) normalised to the image."""
    boxes = []
    for start in range(0, len(dataset), batch_size):
        batch = grounding_collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        outputs = model(image_features=batch["image_features"].to(model.device),
                        text_features=batch["text_features"].to(model.device))  # fmt: skip
        boxes += outputs.pred_boxes.float().tolist()
    return boxes


class GroundingTask(TaskDefaults):
    """A TransVG-style grounding head (`LapvqaGroundingModel`) on MS-CXR phrase boxes (`lapvqa_hf.grounding_data`),
    trained with TransVG's L1 + GIoU loss and scored by mIoU, Acc@0.25, Acc@0.5 and pointing accuracy overall and
    per finding category.

    Phrases are embedded by the text tower of `text_recipe` (default: the one pinned for the features' encoder,
    `lapvqa_hf.models.text_towers`; its weights from `text_checkpoint`), once per distinct phrase, before training:
    the tower is loaded once, on the CPU, and never trained. A head from `init_from` keeps its own text tower."""

    name = "grounding"
    model_class = LapvqaGroundingModel
    options_class = GroundingOptions
    image_preparation = DETECTION_IMAGE_PREPARATION  # the head's own processor (stretched: boxes fit)
    derived_fields = ("vis_dim", "txt_dim", "encoder_name", "feature_recipe", "text_recipe")
    group_label = "category"
    metrics = GROUNDING_METRICS
    generates_text = False

    def __init__(
        self,
        options: GroundingOptions | None = None,
        text_recipe: TextRecipe | None = None,
        text_normalize: bool = True,
    ):
        options = options or GroundingOptions()
        self.text_recipe_name, self.text_checkpoint = options.text_recipe, options.text_checkpoint
        if self.text_checkpoint and Path(self.text_checkpoint).is_dir():  # recorded in the model: absolute
            self.text_checkpoint = str(Path(self.text_checkpoint).resolve())
        self.text_recipe = text_recipe  # the model's, once it is built (or read from a saved one)
        self.text_normalize = text_normalize
        self._text_tower = None  # (model, tokenizer), loaded when first needed
        self.phrase_features: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, config: TrainConfig) -> "GroundingTask":
        return cls(config.options(GroundingOptions))

    @classmethod
    def from_model_config(cls, model_config) -> "GroundingTask":
        if model_config.text_recipe is None:
            raise ValueError("the grounding model names no text tower (config.text_recipe); it cannot embed phrases.")
        return cls(text_recipe=TextRecipe(**model_config.text_recipe), text_normalize=model_config.text_normalize)

    def load_splits(self, data_root: str | Path) -> DatasetDict:
        return load_ms_cxr(data_root)

    def _encode(self, phrases: list[str]) -> torch.Tensor:
        if self._text_tower is None:
            self._text_tower = (load_text_model(self.text_recipe), load_text_tokenizer(self.text_recipe))
        return encode_phrases(*self._text_tower, phrases, self.text_normalize)

    def examples(self, rows, features: FeatureStore, root: Path) -> GroundingExamples:
        require_image_preparation(features, self.image_preparation, self.name)
        rows = list(rows)
        new = [phrase for phrase in dict.fromkeys(row["phrase"] for row in rows) if phrase not in self.phrase_features]
        for start in range(0, len(new), 64):
            chunk = new[start : start + 64]
            encoded = self._encode(chunk)
            if encoded.shape[-1] != self.text_recipe.text_dim:
                raise ValueError(
                    f"the text tower {self.text_recipe.checkpoint} gives {encoded.shape[-1]}-dim phrase features, but "
                    f"the head takes {self.text_recipe.text_dim}; set text_checkpoint to the tower it was trained with."
                )
            self.phrase_features.update(zip(chunk, encoded, strict=True))
        return GroundingExamples(rows, features, root, self.phrase_features)

    def feature_width(self, model: LapvqaGroundingModel) -> int:
        return model.config.vis_dim

    def feature_image_processor(self, recipe: EncoderRecipe, checkpoint: str | None = None):
        """How `lapvqa extract-features` prepares images for this task: as the grounding head's own image processor
        does (stretched to the encoder's size, so that the boxes map back)."""
        return detection_image_processor(recipe)

    def build_model(self, config: TrainConfig, features: FeatureStore) -> LapvqaGroundingModel:
        recipe = features.recipe
        if config.init_from:
            model = model_to_init_from(self, config.init_from, features)
            if model.config.text_recipe is None:
                raise ValueError(f"{config.init_from} names no text tower (config.text_recipe) to embed phrases with.")
            own = TextRecipe(**model.config.text_recipe)
            if self.text_recipe_name not in (None, own.name):
                raise ValueError(
                    f"text_recipe={self.text_recipe_name!r}, but {config.init_from} was trained with the {own.name} "
                    "text tower; remove text_recipe (text_checkpoint may name where its weights are)."
                )
            self.text_recipe = dataclasses.replace(own, checkpoint=self.text_checkpoint or own.checkpoint)
            self.text_normalize = model.config.text_normalize
        else:
            pinned = TEXT_RECIPES[self.text_recipe_name] if self.text_recipe_name else text_recipe_for(recipe.name)
            self.text_recipe = dataclasses.replace(pinned, checkpoint=self.text_checkpoint or pinned.checkpoint)
            self.text_normalize = config.model.get("text_normalize", True)
            text_dim = self._encode(["chest x-ray"]).shape[-1]  # the tower's own width (a resized one for tests)
            self.text_recipe = dataclasses.replace(self.text_recipe, text_dim=text_dim)
            model = LapvqaGroundingModel(
                LapvqaGroundingConfig(
                    vis_dim=recipe.vis_dim, txt_dim=text_dim, encoder_name=registered_encoder_name(recipe),
                    text_recipe=dataclasses.asdict(self.text_recipe), **config.model,
                )
            )  # fmt: skip
        model.config.text_recipe = dataclasses.asdict(self.text_recipe)  # where its weights were read from
        return model

    def collate(self, tokenizer, max_positions: int | None) -> Callable[[list[dict]], dict]:
        return grounding_collate

    def predict(self, model, tokenizer, dataset: GroundingExamples, batch_size: int, max_new_tokens: int) -> list:
        return ground_split(model, dataset, batch_size)

    def references(self, dataset: GroundingExamples) -> list[list[list[float]]]:
        """Each example's ground-truth boxes (x0, y0, x1, y1), normalised."""
        return [corners(row["boxes"]) for row in dataset.rows]

    def score(self, predictions: list, dataset: GroundingExamples) -> dict[str, dict[str, float]]:
        categories = [row["category"] for row in dataset.rows]
        return score_grounding(corners(predictions), self.references(dataset), categories)

    def save(self, model: LapvqaGroundingModel, tokenizer, features: FeatureStore, target: Path) -> None:
        """The model with the image processor its features were prepared by, so that it grounds from pixels."""
        save_pretrained_with_pipeline(model, target)
        detection_image_processor(features.recipe).save_pretrained(target)


def task_for(config: TrainConfig) -> TrainingTask:
    """The training task of `config.task`, a kind of `lapvqa_hf.kinds` that has one."""
    if config.task not in TASKS:
        raise ValueError(f"task={config.task!r}: expected one of {TASKS}.")
    return KINDS[config.task].training_task_class().from_config(config)


def task_for_model(model_config) -> TrainingTask:
    """The task of a saved model (for `lapvqa evaluate`), from its config."""
    kind = kind_of(model_config.model_type)
    if kind is None or kind.training_task is None:
        raise ValueError(
            f"model_type {model_config.model_type!r} has no training task; expected one of "
            f"{', '.join(KINDS[name].model_type for name in TASKS)}."
        )
    return kind.training_task_class().from_model_config(model_config)


def require_image_preparation(features: FeatureStore, expected: str, task: str = "detection") -> None:
    """Refuse features whose images were prepared otherwise than the task's model takes them: a detection or
    grounding head (`task`) needs its own stretched images (so that the boxes fit), the text heads the encoder's own
    processor."""
    found = features.image_preparation
    if found == expected or (found is None and expected == IMAGE_PREPARATION):  # lapvqa-hf 0.1.x: text tasks only
        return
    task, option = (task, f" --task {task}") if expected == DETECTION_IMAGE_PREPARATION else ("text", "")
    raise FeatureError(
        f"{features.output_dir} holds features of images prepared otherwise ({found or 'by lapvqa-hf 0.1.x'}); a "
        f"{task} head needs {expected!r}: extract with `lapvqa extract-features{option}` into another folder."
    )


def registered_encoder_name(recipe) -> str | None:
    """The recipe's encoder name for a new head's config; a recipe resized for experiments (other width) keeps its
    record in `feature_recipe` instead."""
    return recipe.name if ENCODER_WIDTHS.get(recipe.name) == recipe.vis_dim else None


def model_to_init_from(task, init_from: str, features: FeatureStore):
    """The task's model saved at `init_from`, checked to take the width of `features`."""
    model = load_model(task.model_class, init_from)
    check_feature_width(init_from, task.feature_width(model), features)
    return model


def check_feature_width(model_source: str, width: int, features: FeatureStore) -> None:
    if width != features.recipe.vis_dim:
        raise FeatureError(
            f"{model_source} takes {width}-dim features but {features.output_dir} holds {features.recipe.vis_dim}-dim "
            f"ones ({features.recipe.name})."
        )
