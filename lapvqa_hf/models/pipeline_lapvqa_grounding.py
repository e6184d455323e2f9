"""The phrase-grounding pipeline: chest X-ray images and phrases in, one box per phrase out, with the input and
output of transformers' `zero-shot-object-detection` pipeline.

Shipped with grounding folders as remote code (`config.json`'s `custom_pipelines`), beside `pipeline_lapvqa.py`.
"""

import torch
from transformers.loss.loss_for_object_detection import center_to_corners_format

from .pipeline_lapvqa import LapvqaFrozenEncoderPipeline, _check_labels
from .text_towers import TextRecipe, encode_phrases, load_text_model, load_text_tokenizer


class LapvqaGroundingPipeline(LapvqaFrozenEncoderPipeline):
    """`pipe(image, candidate_labels=["left pleural effusion", "cardiomegaly"])` -> one `{"score", "label", "box":
    {"xmin", "ymin", "xmax", "ymax"}}` per phrase, in the phrases' order, the box in the original image's pixels
    (transformers' zero-shot-object-detection output). The head regresses exactly one box per phrase and has no
    confidence of its own: every `score` is 1.0. Also `pipe({"image": ..., "candidate_labels": [...]})` and lists of
    such dicts (a list of results out); `candidate_labels` as one string is split at commas, as transformers' does.

    The image is prepared by the folder's own image processor and encoded by the frozen encoder of `feature_recipe`
    (as the detection pipeline does, see `LapvqaDetectionPipeline`); each phrase by the text tower of `text_recipe`
    (transformers' `AutoModel` and `AutoTokenizer` of its checkpoint, `get_text_features`, L2-normalised with
    `text_normalize`), loaded once: pass `text_encoder=` / `text_tokenizer=` to reuse loaded ones.
    """

    _load_tokenizer = False
    _load_image_processor = True

    def __init__(self, *args, text_encoder: torch.nn.Module | None = None, text_tokenizer=None, **kwargs):
        if kwargs.get("image_processor") is None:
            raise ValueError("The grounding pipeline needs the model folder's image processor (image_processor=).")
        super().__init__(*args, encoder_image_processor=kwargs["image_processor"], **kwargs)
        recorded = getattr(self.model.config, "text_recipe", None)
        if recorded is None:
            raise ValueError(
                f"{type(self.model).__name__} names no text tower (config.text_recipe is empty): convert it with "
                "`lapvqa convert grounding`, or build the pipeline with text_encoder= and text_tokenizer=."
            )
        self.text_recipe = TextRecipe(**recorded)
        text_encoder = text_encoder if text_encoder is not None else load_text_model(self.text_recipe)
        self.text_encoder = text_encoder.to(self.device).eval()
        self.text_tokenizer = text_tokenizer or load_text_tokenizer(self.text_recipe)

    def __call__(self, image, candidate_labels: str | list[str] | None = None, **kwargs):
        if isinstance(image, dict) or (isinstance(image, list) and image and isinstance(image[0], dict)):
            return super().__call__(image, **kwargs)
        if isinstance(image, list):
            return super().__call__([{"image": i, "candidate_labels": candidate_labels} for i in image], **kwargs)
        return super().__call__({"image": image, "candidate_labels": candidate_labels}, **kwargs)

    def _sanitize_parameters(self, **kwargs):
        return {}, {}, {}

    def prepare_image(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """The folder's own image processor (whose resize the boxes undo), and the original's (height, width)."""
        image = self.image_processor.load_image(image)  # read once: its size maps the boxes back
        return self.image_processor(image)["pixel_values"], tuple(image.shape[:2])

    def preprocess(self, inputs: dict) -> dict:
        if not isinstance(inputs, dict) or "image" not in inputs:
            raise ValueError(
                f"The grounding pipeline takes an image and candidate_labels, got {type(inputs).__name__}."
            )
        labels = inputs.get("candidate_labels")
        if isinstance(labels, str):
            labels = [label.strip() for label in labels.split(",") if label.strip()]
        _check_labels(labels)
        pixels, size = self.prepare_image(inputs["image"])
        return {"image_pixel_values": pixels, "target_size": size, "candidate_labels": list(labels)}

    def _forward(self, model_inputs: dict) -> dict:
        labels = model_inputs["candidate_labels"]
        features = self.encode(model_inputs["image_pixel_values"])
        sizes = [model_inputs["target_size"]] * len(labels)
        return {"results": self.ground(features.expand(len(labels), -1, -1), labels, sizes)}

    def postprocess(self, model_outputs: dict) -> list[dict]:
        if any(result is None for result in model_outputs["results"]):
            raise ValueError("The model gave a non-finite box (NaN or inf) for this image.")
        return model_outputs["results"]

    def phrase_features(self, phrases: list[str]) -> torch.Tensor:
        """`[len(phrases), txt_dim]`: each phrase embedded by the text tower (each distinct phrase once)."""
        distinct = list(dict.fromkeys(phrases))
        features = encode_phrases(self.text_encoder, self.text_tokenizer, distinct, self.model.config.text_normalize)
        if features.shape[-1] != self.model.config.txt_dim:
            raise ValueError(
                f"the text tower {self.text_recipe.checkpoint} gives {features.shape[-1]}-dim phrase features, but "
                f"this head takes {self.model.config.txt_dim}; use the text tower it was trained with."
            )
        return features[[distinct.index(phrase) for phrase in phrases]]

    def ground(
        self, image_features: torch.Tensor, phrases: list[str], target_sizes: list[tuple[int, int]]
    ) -> list[dict | None]:
        """One box per row for a batch of encoded images (from `encode`) and one phrase each, in the original
        pixels (`target_sizes`, the (height, width) `prepare_image` gives): `{"score": 1.0, "label": phrase, "box":
        {...}}`, or None where the box is not finite. The batch entry point for callers that encode images
        themselves (`lapvqa answer` caches them)."""
        text_features = self.phrase_features(phrases).to(self.model.device)
        boxes = self.model(image_features=image_features, text_features=text_features).pred_boxes.float()
        results = []
        for phrase, box, (height, width) in zip(phrases, center_to_corners_format(boxes), target_sizes, strict=True):
            if not torch.isfinite(box).all():
                results.append(None)
                continue
            pixels = self.image_processor.boxes_to_original(box[None], int(height), int(width))[0]
            corners = dict(zip(("xmin", "ymin", "xmax", "ymax"), (round(v, 2) for v in pixels.tolist()), strict=True))
            results.append({"score": 1.0, "label": phrase, "box": corners})
        return results


__all__ = ["LapvqaGroundingPipeline"]
