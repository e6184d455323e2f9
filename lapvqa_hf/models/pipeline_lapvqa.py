"""Pipelines from chest X-ray images to answers, reports and boxes, one per LAPVQA model kind.

Converted folders name their pipeline in `config.json` (`custom_pipelines`) and carry this file, so that
`transformers.pipeline(model=DIR_OR_HUB_ID, trust_remote_code=True)` works without `lapvqa_hf` installed.
The heads that take a frozen encoder's patch tokens (DiffVQA, VQA, report generation, detection) load that encoder
from its own repo, as the head's `config.feature_recipe` names it, and prepare images as that recipe does.

Images may be file paths (PNG, JPEG, DICOM), PIL images or arrays; X-rays are read by `LapvqaImageProcessor`
(16-bit, DICOM windowing, MONOCHROME1). Prepared images travel between the pipeline steps as `*_pixel_values`:
transformers' batching treats a key named `pixel_values` as feature-extractor output, which these pipelines lack.
"""

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers import Pipeline, PreTrainedModel
from transformers.utils import logging

from .encoders import (
    RECIPES,
    EncoderError,
    EncoderRecipe,
    load_encoder,
    load_encoder_image_processor,
    patch_tokens,
)
from .greedy_decoding import fast_greedy_applies, greedy_generate
from .image_processing_lapvqa import LapvqaImageProcessor
from .processing_lapvqa import left_padded, question_prompt

logger = logging.get_logger(__name__)


def room_for_new_tokens(config, prompt_length: int) -> int:
    """How many tokens `generate()` may add to a prompt of `prompt_length` tokens within the model's learned
    positions (the last new token is never fed back, so it needs no position)."""
    return config.max_position_embeddings - prompt_length + 1


def fitted_generate_kwargs(model: PreTrainedModel, prompt_length: int, generate_kwargs: dict) -> dict:
    """`generate_kwargs` with `max_new_tokens` (given, else the model's default) capped to the room the prompt leaves
    in the learned positions, saying so once; a prompt that leaves no room is refused in one line."""
    room = room_for_new_tokens(model.config, prompt_length)
    if room < 1:
        limit = model.config.max_position_embeddings
        raise ValueError(
            f"The prompt has {prompt_length} tokens, more than the {limit} learned positions of this model: shorten "
            f"the question to at most {limit - 1} tokens."
        )
    if "max_length" in generate_kwargs:  # the caller sized the whole sequence: generate() checks it
        return generate_kwargs
    wanted = generate_kwargs.get("max_new_tokens") or model.generation_config.max_new_tokens
    if wanted is None or wanted <= room:
        return generate_kwargs
    logger.warning_once(
        f"max_new_tokens={wanted} does not fit the {model.config.max_position_embeddings} learned positions of this "
        f"model after a prompt of {prompt_length} tokens: answers to such prompts stop at {room} new tokens."
    )
    return {**generate_kwargs, "max_new_tokens": room}


def _generated_per_input(generated: torch.Tensor, prompt_length: int, batch_size: int) -> torch.Tensor:
    """The new tokens `[batch, num_return_sequences, new_tokens]`, so that batched outputs split per input."""
    new_tokens = generated[:, prompt_length:]
    return new_tokens.reshape(batch_size, -1, new_tokens.shape[-1])


@dataclass
class GeneratedTexts:
    """What `generate_texts` gives for a batch: the decoded texts (one per prompt and returned sequence), the whole
    sequences `generate()` returned (prompt + new tokens) and the prompts' left-padded attention mask."""

    texts: list[str]
    sequences: torch.Tensor
    prompt_attention_mask: torch.Tensor


class LapvqaPipeline(Pipeline):
    """transformers' `Pipeline`, with what every LAPVQA pipeline adds: an empty list in gives an empty list out."""

    def __call__(self, inputs, *args, **kwargs):
        if isinstance(inputs, list) and not inputs:
            return []
        return super().__call__(inputs, *args, **kwargs)

    def prompt_ids(self, question: str | None = None) -> list[int]:
        """The prompt `generate()` continues: `question + [bos]` for the question-answering heads, `[bos]` alone for
        report generation (`question=None`); see `question_prompt`."""
        if question is None:
            return [self.model.config.bos_token_id]
        return question_prompt(self.tokenizer, question, self.model.config.max_position_embeddings)

    def generate_texts(self, prompts: list[list[int]], visual_inputs: dict, **generate_kwargs) -> GeneratedTexts:
        """Generates for a batch of prompts (from `prompt_ids`), left-padded together, with the model's visual
        inputs (`image_features`, `prior_image_features` / `current_image_features`, `pixel_values`: one row per
        prompt); `max_new_tokens` is capped to the room the longest prompt leaves in the learned positions. The
        batch entry point for callers that encode images themselves (`lapvqa answer` caches them)."""
        inputs = left_padded(prompts, self.model.config.pad_token_id).to(self.model.device)
        sequences = self._generate(inputs, visual_inputs, generate_kwargs)
        new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
        texts = [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return GeneratedTexts(texts=texts, sequences=sequences, prompt_attention_mask=inputs["attention_mask"])

    def _generate(self, prompts: dict, visual_inputs: dict, generate_kwargs: dict) -> torch.Tensor:
        input_ids = prompts["input_ids"]
        generate_kwargs = fitted_generate_kwargs(self.model, input_ids.shape[1], generate_kwargs)
        if fast_greedy_applies(self.model.device, generate_kwargs):  # plain greedy on a GPU: the step on the device
            return greedy_generate(
                self.model, input_ids, prompts["attention_mask"], generate_kwargs.get("max_new_tokens"), **visual_inputs
            )
        return self.model.generate(
            input_ids=input_ids, attention_mask=prompts["attention_mask"], **visual_inputs, **generate_kwargs
        )


class LapvqaFrozenEncoderPipeline(LapvqaPipeline):
    """What the heads fed by a frozen encoder share: the encoder named by the head's `feature_recipe` and its own
    image processor, loaded once (pass `encoder=` / `encoder_image_processor=` to reuse loaded ones), and batched
    encoding. A folder that holds its encoder (`config.encoder_config`: a native head with its fine-tuned encoder)
    runs with that encoder (`model.vision_model`) and the image processor saved beside it. X-rays are read by `LapvqaImageProcessor` (16-bit, DICOM), then prepared by the encoder's processor,
    as `lapvqa extract-features` prepares them for training."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def __init__(self, *args, encoder: torch.nn.Module | None = None, encoder_image_processor=None, **kwargs):
        super().__init__(*args, **kwargs)
        recorded = getattr(self.model.config, "feature_recipe", None)
        if recorded is None:
            raise ValueError(
                f"{type(self.model).__name__} names no frozen encoder (config.feature_recipe is empty): convert it "
                "with `lapvqa convert ... --encoder NAME`, or build the pipeline with encoder= and a feature_recipe."
            )
        self.recipe = EncoderRecipe(**recorded)
        held = getattr(self.model, "vision_model", None)  # a folder that holds its (fine-tuned) encoder
        if encoder is None and held is not None:
            encoder = held
            # saved beside the weights: the processor of the encoder the folder holds
            encoder_image_processor = encoder_image_processor or load_encoder_image_processor(
                dataclasses.replace(self.recipe, revision=getattr(self.model.config, "_commit_hash", None)),
                self.model.name_or_path,
            )
        if encoder is None:
            self._require_the_fine_tuned_encoder()
        self.encoder = (encoder if encoder is not None else load_encoder(self.recipe)).to(self.device).eval()
        self.encoder_image_processor = encoder_image_processor or load_encoder_image_processor(self.recipe)
        self.xray_image_processor = LapvqaImageProcessor()

    def _require_the_fine_tuned_encoder(self) -> None:
        """A head trained with its encoder fine-tuned (`config.encoder_finetuned`, the "native" files) is not
        reproduced by the off-the-shelf encoder: refuse, in one line, to load the recipe's own checkpoint for it."""
        registered = RECIPES.get(self.recipe.name)
        if not getattr(self.model.config, "encoder_finetuned", False) or registered is None:
            return
        if self.recipe.checkpoint == registered.checkpoint:
            raise EncoderError(
                f"{self.model.name_or_path or type(self.model).__name__} was trained with its {self.recipe.name} "
                f"encoder fine-tuned, and that encoder is missing (the folder names the off-the-shelf "
                f"{registered.checkpoint}): convert it with `--encoder-checkpoint` naming the fine-tuned encoder's "
                "folder or Hub id, or pass that encoder to the pipeline as `encoder=`."
            )

    def pixel_values(self, images: list) -> torch.Tensor:
        """Images as the encoder's own processor prepares them."""
        return self.xray_image_processor.encoder_pixel_values(images, self.encoder_image_processor)

    def prepare_image(self, image) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """One image as the model takes it (`[1, C, H, W]`), and the original's (height, width) where the outputs
        refer to it (detection boxes), else None."""
        return self.pixel_values([image]), None

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder's patch tokens `[batch, num_patches, vis_dim]` for prepared images."""
        dtype = next(self.encoder.parameters()).dtype
        return patch_tokens(self.recipe, self.encoder, pixel_values.to(self.device, dtype))

    def _question_prompt(self, question: str) -> dict[str, torch.Tensor]:
        """`question + [bos]` as model inputs (transformers' batching left-pads them with the attention mask)."""
        return dict(left_padded([self.prompt_ids(question)], self.model.config.pad_token_id))

    def _answer(self, model_inputs: dict, generate_kwargs: dict, **visual_inputs) -> dict[str, torch.Tensor]:
        """`generate()` from the question prompts and the encoded images; the answers without the prompts."""
        generated = self._generate(model_inputs, visual_inputs, generate_kwargs)
        prompt_length = model_inputs["input_ids"].shape[1]
        return {"generated_ids": _generated_per_input(generated, prompt_length, len(model_inputs["input_ids"]))}

    def _sanitize_parameters(self, **generate_kwargs):
        return {}, {"generate_kwargs": generate_kwargs}, {}

    def postprocess(self, model_outputs: dict) -> dict | list[dict]:
        answers = [
            {"answer": self.tokenizer.decode(ids, skip_special_tokens=True).strip()}
            for ids in model_outputs["generated_ids"][0]
        ]
        return answers[0] if len(answers) == 1 else answers


def _require_keys(inputs, keys: tuple[str, ...], task: str) -> None:
    if not isinstance(inputs, dict) or any(key not in inputs for key in keys):
        given = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
        raise ValueError(f"{task} takes a dict with {list(keys)} (or a list of them), got {given}.")


class LapvqaDiffVQAPipeline(LapvqaFrozenEncoderPipeline):
    """`pipe({"prior_image": ..., "current_image": ..., "question": "..."})` -> `{"answer": "..."}`; a list in
    gives a list out (`batch_size=` batches it); generation arguments (`max_new_tokens`, `num_beams`, ...) pass
    through to `generate()`."""

    def preprocess(self, inputs: dict) -> dict[str, torch.Tensor]:
        _require_keys(inputs, ("prior_image", "current_image", "question"), "The DiffVQA pipeline")
        pixels = self.pixel_values([inputs["prior_image"], inputs["current_image"]])
        return {"prior_pixel_values": pixels[:1], "current_pixel_values": pixels[1:], **self._question_prompt(
            inputs["question"])}  # fmt: skip

    def _forward(self, model_inputs: dict, generate_kwargs: dict) -> dict[str, torch.Tensor]:
        prior = self.encode(model_inputs["prior_pixel_values"])
        current = self.encode(model_inputs["current_pixel_values"])
        return self._answer(model_inputs, generate_kwargs, prior_image_features=prior, current_image_features=current)


class LapvqaVQAPipeline(LapvqaFrozenEncoderPipeline):
    """`pipe({"image": ..., "question": "..."})` -> `{"answer": "..."}`, like the DiffVQA pipeline."""

    def preprocess(self, inputs: dict) -> dict[str, torch.Tensor]:
        _require_keys(inputs, ("image", "question"), "The VQA pipeline")
        pixels = self.pixel_values([inputs["image"]])
        return {"image_pixel_values": pixels, **self._question_prompt(inputs["question"])}

    def _forward(self, model_inputs: dict, generate_kwargs: dict) -> dict[str, torch.Tensor]:
        image_features = self.encode(model_inputs["image_pixel_values"])
        return self._answer(model_inputs, generate_kwargs, image_features=image_features)


class LapvqaDetectionPipeline(LapvqaFrozenEncoderPipeline):
    """`pipe(image, threshold=0.5)` -> transformers' object-detection output: a list of `{"score", "label", "box":
    {"xmin", "ymin", "xmax", "ymax"}}` in the original image's pixels, best first. The folder's own image processor
    prepares the image (the encoder recipe's size and normalisation, and the recorded resize mode, whose effect on
    the boxes `post_process_object_detection` undoes; an encoder processor's centre crop could not be undone)."""

    _load_tokenizer = False
    _load_image_processor = True

    def __init__(self, *args, **kwargs):
        if kwargs.get("image_processor") is None:
            raise ValueError("The detection pipeline needs the model folder's image processor (image_processor=).")
        super().__init__(*args, encoder_image_processor=kwargs["image_processor"], **kwargs)

    def _sanitize_parameters(self, threshold: float | None = None, top_k: int | None = None):
        postprocess = {"threshold": threshold if threshold is not None else 0.5}
        if top_k is not None:
            postprocess["top_k"] = top_k
        return {}, {}, postprocess

    def prepare_image(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """The folder's own image processor (whose resize the boxes undo), and the original's (height, width)."""
        image = self.image_processor.load_image(image)  # read once: its size maps the boxes back
        return self.image_processor(image)["pixel_values"], tuple(image.shape[:2])

    def preprocess(self, image) -> dict[str, torch.Tensor]:
        pixels, size = self.prepare_image(image)
        return {"image_pixel_values": pixels, "target_size": torch.tensor([list(size)])}

    def _forward(self, model_inputs: dict) -> dict:
        outputs = self.model(image_features=self.encode(model_inputs["image_pixel_values"]))
        return {"logits": outputs.logits, "pred_boxes": outputs.pred_boxes, "target_size": model_inputs["target_size"]}

    def postprocess(self, model_outputs: dict, threshold: float = 0.5, top_k: int | None = None) -> list[dict]:
        (boxes,) = self._boxes(
            model_outputs["logits"],
            model_outputs["pred_boxes"],
            model_outputs["target_size"].tolist(),
            threshold,
            top_k,
        )
        if boxes is None:
            raise ValueError("The model gave non-finite scores or boxes (NaN or inf) for this image.")
        return boxes

    def detect(
        self,
        image_features: torch.Tensor,
        target_sizes: list[tuple[int, int]],
        threshold: float = 0.5,
        top_k: int | None = None,
    ) -> list[list[dict] | None]:
        """Boxes for a batch of encoded images (from `encode`), in their original pixels (`target_sizes`, the
        (height, width) `prepare_image` gives), best first; None for an image whose scores or boxes are not finite.
        The batch entry point for callers that encode images themselves (`lapvqa answer` caches them)."""
        outputs = self.model(image_features=image_features)
        return self._boxes(outputs.logits, outputs.pred_boxes, [list(size) for size in target_sizes], threshold, top_k)

    def _boxes(self, logits, pred_boxes, target_sizes: list, threshold: float, top_k: int | None) -> list:
        detections = self.image_processor.post_process_object_detection(
            SimpleNamespace(logits=logits, pred_boxes=pred_boxes),
            threshold=threshold,
            target_sizes=target_sizes,
            top_k=top_k,
        )
        labels, found = self.model.config.id2label, []
        for image_logits, image_boxes, image in zip(logits, pred_boxes, detections, strict=True):
            if not (torch.isfinite(image_logits).all() and torch.isfinite(image_boxes).all()):
                found.append(None)
                continue
            found.append([
                {
                    "score": score.item(),
                    "label": labels[int(label)],
                    "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), (round(v, 2) for v in box.tolist()), strict=True)),
                }
                for score, label, box in zip(image["scores"], image["labels"], image["boxes"], strict=True)
            ])  # fmt: skip
        return found


def generated_reports(tokenizer, model_outputs: dict) -> list[dict]:
    """transformers' image-to-text output, one `{"generated_text"}` per returned sequence; `lapvqa answer` writes it
    as `report`."""
    return [
        {"generated_text": tokenizer.decode(ids, skip_special_tokens=True).strip()}
        for ids in model_outputs["generated_ids"][0]
    ]


class LapvqaReportGenerationPipeline(LapvqaFrozenEncoderPipeline):
    """`pipe(image)` -> `[{"generated_text": "..."}]` (transformers' image-to-text output): the report the head
    writes from `[bos]` over its frozen encoder's patch tokens; a list in gives a list of those out (`batch_size=`
    batches it); generation arguments pass through to `generate()`. A head trained with a fine-tuned encoder
    (`encoder_finetuned`) needs that encoder named (see `LapvqaFrozenEncoderPipeline`)."""

    def preprocess(self, image) -> dict[str, torch.Tensor]:
        prompt = left_padded([self.prompt_ids()], self.model.config.pad_token_id)  # [bos]
        return {"image_pixel_values": self.prepare_image(image)[0], **prompt}

    def _forward(self, model_inputs: dict, generate_kwargs: dict) -> dict[str, torch.Tensor]:
        image_features = self.encode(model_inputs["image_pixel_values"])
        return self._answer(model_inputs, generate_kwargs, image_features=image_features)

    def postprocess(self, model_outputs: dict) -> list[dict]:
        return generated_reports(self.tokenizer, model_outputs)


class LapvqaCaptioningPipeline(LapvqaPipeline):
    """`pipe(image)` -> `[{"generated_text": "..."}]` (transformers' image-to-text output): a report written by the
    captioning model's own encoder and decoder; generation arguments pass through to `generate()`."""

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(self, **generate_kwargs):
        return {}, {"generate_kwargs": generate_kwargs}, {}

    def prepare_image(self, image) -> tuple[torch.Tensor, None]:
        """One image as the model's own encoder takes it (`[1, C, H, W]`)."""
        return self.image_processor(image)["pixel_values"], None

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's own encoder's patch tokens `[batch, num_patches, width]`: `image_features` of the model."""
        model = self.model
        return model.vision_model(pixel_values.to(model.device, model.dtype)).last_hidden_state

    def preprocess(self, image) -> dict[str, torch.Tensor]:
        prompt = left_padded([self.prompt_ids()], self.model.config.pad_token_id)  # [bos]
        return {"image_pixel_values": self.prepare_image(image)[0], **prompt}

    def _forward(self, model_inputs: dict, generate_kwargs: dict) -> dict[str, torch.Tensor]:
        pixel_values = model_inputs["image_pixel_values"].to(self.model.dtype)
        generated = self._generate(model_inputs, {"pixel_values": pixel_values}, generate_kwargs)
        prompt_length = model_inputs["input_ids"].shape[1]
        return {"generated_ids": _generated_per_input(generated, prompt_length, len(model_inputs["input_ids"]))}

    def postprocess(self, model_outputs: dict) -> list[dict]:
        return generated_reports(self.tokenizer, model_outputs)


class LapvqaTwoTowerPipeline(LapvqaPipeline):
    """What the two-tower models' pipelines share: the folder's image processor reads the X-ray (PNG/JPEG 8 or 16
    bit, DICOM, PIL, arrays), the folder's tokenizer appends eot to every text."""

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False

    def prepare_image(self, image) -> tuple[torch.Tensor, None]:
        """One image as the image tower takes it (`[1, C, H, W]`)."""
        return self.image_processor(image)["pixel_values"], None

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The projected image embeddings (`get_image_features`), not normalised: `[batch, projection_dim]`."""
        pixel_values = pixel_values.to(self.model.device, self.model.dtype)
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output


class LapvqaZeroShotFindingsPipeline(LapvqaTwoTowerPipeline):
    """`pipe(image, candidate_labels=["pleural effusion", "no acute findings"])` -> `[{"score", "label"}]`, best
    first (transformers' zero-shot-image-classification output). Scores are a softmax over the candidates for the
    contrastive model and independent sigmoids for the sigmoid model (the one with `logit_bias`), as CLIP's and
    SigLIP's are. `hypothesis_template` (default `"{}"`) turns a label into the text the report tower reads."""

    _load_tokenizer = True

    def _sanitize_parameters(self, candidate_labels=None, hypothesis_template: str | None = None):
        preprocess = {}
        if candidate_labels is not None:
            preprocess["candidate_labels"] = candidate_labels
        forward = {"hypothesis_template": hypothesis_template} if hypothesis_template is not None else {}
        return preprocess, forward, {}

    def preprocess(self, image, candidate_labels=None) -> dict:
        if isinstance(candidate_labels, str):
            candidate_labels = [label.strip() for label in candidate_labels.split(",") if label.strip()]
        _check_labels(candidate_labels)
        return {"image_pixel_values": self.prepare_image(image)[0], "candidate_labels": list(candidate_labels)}

    def _forward(self, model_inputs: dict, hypothesis_template: str = "{}") -> dict:
        embeddings = self.encode(model_inputs["image_pixel_values"])
        labels = model_inputs["candidate_labels"]
        return {"scores": self.score(embeddings, [labels], hypothesis_template)[0]}

    def postprocess(self, model_outputs: dict) -> list[dict]:
        if model_outputs["scores"] is None:
            raise ValueError("The model gave non-finite scores (NaN or inf) for this image.")
        return model_outputs["scores"]

    def score(
        self, image_embeddings: torch.Tensor, candidate_labels: list[list[str]], hypothesis_template: str = "{}"
    ) -> list[list[dict] | None]:
        """Each image's candidate findings ranked by score (`[{"score", "label"}]`, best first), for a batch of
        encoded images (from `encode`); None for an image whose scores are not finite. The batch entry point for
        callers that encode images themselves (`lapvqa answer` caches them)."""
        results = []
        for embedding, labels in zip(image_embeddings, candidate_labels, strict=True):
            _check_labels(labels)
            texts = self.tokenizer(
                [hypothesis_template.format(label) for label in labels], padding=True, truncation=True,
                return_tensors="pt",
            ).to(self.model.device)  # fmt: skip
            text_features = self.model.get_text_features(**texts).pooler_output
            logits = self.model.similarity(embedding[None], text_features)[0].float()
            if not torch.isfinite(logits).all():
                results.append(None)
                continue
            scores = logits.sigmoid() if self.model.config.use_logit_bias else logits.softmax(dim=-1)
            ranked = sorted(zip(scores.tolist(), labels, strict=True), key=lambda pair: -pair[0])
            results.append([{"score": score, "label": label} for score, label in ranked])
        return results


def _check_labels(candidate_labels) -> None:
    if not candidate_labels or not all(isinstance(label, str) and label.strip() for label in candidate_labels):
        raise ValueError(
            f"candidate_labels must be a non-empty list of findings (non-empty strings), got {candidate_labels!r}."
        )


class LapvqaImageEmbeddingPipeline(LapvqaTwoTowerPipeline):
    """`pipe(image)` -> the image's embedding in the shared space, as a list of floats (transformers'
    image-feature-extraction output is nested lists); `normalize=True` (default) L2-normalises it, as retrieval
    and the logits use it; `return_tensors=True` gives the tensor."""

    _load_tokenizer = False

    def _sanitize_parameters(self, normalize: bool | None = None, return_tensors: bool | None = None):
        postprocess = {}
        if normalize is not None:
            postprocess["normalize"] = normalize
        if return_tensors is not None:
            postprocess["return_tensors"] = return_tensors
        return {}, {}, postprocess

    def preprocess(self, image) -> dict:
        return {"image_pixel_values": self.prepare_image(image)[0]}

    def _forward(self, model_inputs: dict) -> dict:
        return {"embedding": self.encode(model_inputs["image_pixel_values"])}

    def postprocess(self, model_outputs: dict, normalize: bool = True, return_tensors: bool = False):
        embedding = model_outputs["embedding"][0].float()
        if not torch.isfinite(embedding).all():
            raise ValueError("The model gave a non-finite embedding (NaN or inf) for this image.")
        if normalize:
            embedding = torch.nn.functional.normalize(embedding, dim=-1)
        return embedding if return_tensors else embedding.tolist()


__all__ = [
    "fitted_generate_kwargs",
    "room_for_new_tokens",
    "LapvqaCaptioningPipeline",
    "LapvqaDetectionPipeline",
    "LapvqaDiffVQAPipeline",
    "LapvqaFrozenEncoderPipeline",
    "LapvqaImageEmbeddingPipeline",
    "LapvqaPipeline",
    "LapvqaReportGenerationPipeline",
    "LapvqaTwoTowerPipeline",
    "LapvqaVQAPipeline",
    "LapvqaZeroShotFindingsPipeline",
]
