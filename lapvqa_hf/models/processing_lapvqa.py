"""`LapvqaProcessor`: chest X-ray images + GPT-2 text in the prompt layouts of the LAPVQA models."""

import torch
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_lapvqa import LapvqaImageProcessor
from .xray_reading import ImageSource


def question_prompt(tokenizer, question: str, max_positions: int | None = None) -> list[int]:
    """`question + [bos]`: the prompt the question-answering heads were trained on, which `generate()` continues
    with the answer. The one prompt builder of the package (processor, pipelines, `lapvqa answer`, training).

    A question that is not a non-empty string is refused; so is one that, with its bos, fills more than
    `max_positions` learned positions (None: not checked, as training cuts whole sequences to the positions)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"A question must be a non-empty string, got {question!r}.")
    try:
        ids = tokenizer(question, add_special_tokens=False, verbose=False)["input_ids"]
    except UnicodeEncodeError:
        raise ValueError("The question is not valid Unicode text (it holds a lone surrogate).") from None
    if max_positions is not None and len(ids) + 1 > max_positions:
        raise ValueError(
            f"The question has {len(ids)} tokens; this model's {max_positions} learned positions hold at most "
            f"{max_positions - 1} (with the bos token that starts the answer): shorten it."
        )
    return ids + [tokenizer.bos_token_id]


def left_padded(prompts: list[list[int]], pad_token_id: int, return_tensors: str | None = "pt") -> BatchFeature:
    """Prompts of different lengths as one batch for `generate()`: `input_ids` padded on the left (so that every
    prompt ends where generation starts) and the `attention_mask` that is 0 on the padding."""
    if not prompts:
        raise ValueError("No prompts to batch.")
    width = max(len(prompt) for prompt in prompts)
    data = {
        "input_ids": [[pad_token_id] * (width - len(p)) + list(p) for p in prompts],
        "attention_mask": [[0] * (width - len(p)) + [1] * len(p) for p in prompts],
    }
    return BatchFeature(data=data, tensor_type=return_tensors)


class LapvqaProcessor(ProcessorMixin):
    r"""
    Pairs [`LapvqaImageProcessor`] with the GPT-2 tokenizer (bos = eos = pad = `<|endoftext|>`).

    - Captioning: `processor(images=...)` gives `pixel_values` and the `[bos]` start for `generate()`;
      `processor(images=..., text=reports)` gives `[bos] + report + [eos]`, right-padded, with `labels`
      (-100 on padding) for training.
    - VQA (`task="vqa"`): `processor(images=..., text=questions)` gives `pixel_values` and the prompt
      `question + [bos]`, left-padded, with its `attention_mask`.
    - DiffVQA: `processor(prior_images=..., current_images=..., text=questions)` gives `prior_pixel_values`,
      `current_pixel_values` and the same prompts.
    The pixel values of the question-answering heads go through their frozen encoder (e.g. `LapvqaVisionModel`)
    to become `image_features` / `prior_image_features` / `current_image_features`. Text longer than the model's learned positions
    (`tokenizer.model_max_length`) is refused.

    Args:
        image_processor ([`LapvqaImageProcessor`]), tokenizer: the GPT-2 tokenizer.
        task (`str`, defaults to `"captioning"`): what `text=` means with `images=`: reports (`"captioning"`)
            or questions (`"vqa"`). Saved in `processor_config.json`.
    """

    TASKS = ("captioning", "vqa")

    def __init__(self, image_processor: LapvqaImageProcessor, tokenizer, task: str = "captioning"):
        if task not in self.TASKS:
            raise ValueError(f"task must be one of {self.TASKS}, got {task!r}.")
        self.task = task
        super().__init__(image_processor, tokenizer)

    def __call__(
        self,
        images: ImageSource | list[ImageSource] | None = None,
        text: str | list[str] | None = None,
        prior_images: ImageSource | list[ImageSource] | None = None,
        current_images: ImageSource | list[ImageSource] | None = None,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        if kwargs:
            raise ValueError(f"Unexpected arguments {sorted(kwargs)}.")
        if prior_images is not None or current_images is not None:
            if images is not None:
                raise ValueError("Pass either images= (captioning) or prior_images= and current_images= (DiffVQA).")
            return self._diffvqa_inputs(prior_images, current_images, text, return_tensors)
        if images is None:
            raise ValueError(
                "No images given: pass images= (captioning, VQA) or prior_images= and current_images= (DiffVQA)."
            )
        if self.task == "vqa":
            return self._vqa_inputs(images, text, return_tensors)
        return self._captioning_inputs(images, text, return_tensors)

    def _pixel_values(self, images, return_tensors: str) -> torch.Tensor:
        return self.image_processor(images, return_tensors=return_tensors)["pixel_values"]

    def _report_ids(self, reports: list[str]) -> list[list[int]]:
        limit = self.tokenizer.model_max_length
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in reports]
        for i, sample in enumerate(ids):
            if len(sample) + 2 > limit:
                raise ValueError(
                    f"report {i} has {len(sample)} tokens; with bos and eos it needs {len(sample) + 2} of the "
                    f"model's {limit} learned positions ({len(sample) + 2 - limit} too many). Shorten it."
                )
        return ids

    def _captioning_inputs(self, images, reports, return_tensors: str) -> BatchFeature:
        pixel_values = self._pixel_values(images, return_tensors)
        batch = len(pixel_values)
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        if reports is None:
            input_ids = [[bos]] * batch
            attention_mask = [[1]] * batch
            data = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
            return BatchFeature(data=data, tensor_type=return_tensors)
        reports = [reports] if isinstance(reports, str) else list(reports)
        if len(reports) != batch:
            raise ValueError(f"Got {batch} images but {len(reports)} reports; pass one report per image.")
        sequences = [[bos, *ids, eos] for ids in self._report_ids(reports)]
        width = max(len(s) for s in sequences)
        input_ids = [s + [eos] * (width - len(s)) for s in sequences]
        attention_mask = [[1] * len(s) + [0] * (width - len(s)) for s in sequences]
        labels = [s + [-100] * (width - len(s)) for s in sequences]
        data = {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _question_prompts(self, questions: str | list[str] | None, batch: int, what: str) -> BatchFeature:
        """`question + [bos]` per sample, left-padded, with the attention mask."""
        if questions is None:
            raise ValueError(f"Questions are needed: pass text= (one question per {what}).")
        questions = [questions] if isinstance(questions, str) else list(questions)
        if len(questions) != batch:
            raise ValueError(f"Got {batch} {what}s but {len(questions)} questions; pass one question per {what}.")
        prompts = []
        for i, question in enumerate(questions):
            try:
                prompts.append(question_prompt(self.tokenizer, question, self.tokenizer.model_max_length))
            except ValueError as error:
                raise ValueError(f"question {i}: {error}") from None
        return left_padded(prompts, self.tokenizer.pad_token_id, return_tensors=None)

    def _vqa_inputs(self, images, questions, return_tensors: str) -> BatchFeature:
        pixel_values = self._pixel_values(images, return_tensors)
        data = {"pixel_values": pixel_values, **self._question_prompts(questions, len(pixel_values), "image")}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _diffvqa_inputs(self, prior_images, current_images, questions, return_tensors: str) -> BatchFeature:
        if prior_images is None or current_images is None:
            raise ValueError("DiffVQA needs both prior_images= (the reference study) and current_images=.")
        prior = self._pixel_values(prior_images, return_tensors)
        current = self._pixel_values(current_images, return_tensors)
        if len(prior) != len(current):
            raise ValueError(f"Got {len(prior)} prior images and {len(current)} current images; pass them in pairs.")
        data = {
            "prior_pixel_values": prior,
            "current_pixel_values": current,
            **self._question_prompts(questions, len(prior), "(prior, current) pair"),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)


class LapvqaTwoTowerProcessor(ProcessorMixin):
    r"""
    Pairs [`LapvqaImageProcessor`] with the two-tower models' GPT-2 tokenizer, which appends `<|endoftext|>` (the
    text embedding is taken there), pads on the right and masks the padding, as CLIP's processor pairs its own.

    `processor(images=..., text=...)` gives `pixel_values` and/or `input_ids` + `attention_mask`; texts longer than
    the encoder's learned positions are truncated (their eot kept).
    """

    def __init__(self, image_processor: LapvqaImageProcessor, tokenizer):
        super().__init__(image_processor, tokenizer)

    def __call__(
        self,
        images: ImageSource | list[ImageSource] | None = None,
        text: str | list[str] | None = None,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("Pass images=, text= or both.")
        data = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"text= must be a string or a non-empty list of strings, got {text!r}.")
            options = {"padding": True, "truncation": True, **kwargs}
            data.update(self.tokenizer(texts, return_tensors=return_tensors, **options))
        elif kwargs:
            raise ValueError(f"Unexpected arguments {sorted(kwargs)} (tokenizer options need text=).")
        if images is not None:
            data["pixel_values"] = self.image_processor(images, return_tensors=return_tensors)["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)


__all__ = ["LapvqaProcessor", "LapvqaTwoTowerProcessor", "left_padded", "question_prompt"]
