"""Hub model cards for the converted LAPVQA repos, rendered from `model_cards/model_card.md` with huggingface_hub."""

from importlib import resources

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .collection import Collection, CollectionModel

DESCRIPTIONS = {
    "diffvqa": (
        "Differential visual question answering on chest X-rays: given the frozen {encoder} encoder's patch tokens "
        "of a *prior* (reference) and a *current* study, a 6-layer transformer decoder answers a question about the "
        "change between them (MIMIC-Diff-VQA)."
    ),
    "vqa": (
        "Visual question answering on chest X-rays: given the frozen {encoder} encoder's patch tokens of one "
        "study, a 6-layer transformer decoder answers a free-text question about it."
    ),
    "captioning": (
        "Radiology report generation: a ViT-L/14 encoder and a 6-layer causal transformer decoder trained from "
        "scratch on MIMIC-CXR to write the full report of a chest X-ray."
    ),
    "vision-encoder": (
        "The ViT-L/14 encoder of the LAPVQA captioning model, the collection's strongest frozen chest X-ray feature "
        "extractor: its patch tokens (`[batch, 256, 1024]` at 224 px) feed the LAPVQA task heads."
    ),
    "coca-vision-encoder": (
        "The image tower of open_clip's CoCa ViT-L/14 (LAION-2B, fine-tuned on MSCOCO captions), converted to "
        "Transformers: the frozen encoder of the LAPVQA CoCa heads. Its attentional pooler gives 255 image tokens "
        "(`[batch, 255, 768]`) and CoCa's contrastive image embedding; no open_clip is needed to run it."
    ),
    "detection": (
        "Abnormality detection on chest X-rays: a DETR-style head (2 encoder layers, 20 object queries, 3 decoder "
        "layers) over the frozen {encoder} encoder's patch tokens predicts boxes of VinDr-CXR's 14 abnormality "
        "classes."
    ),
}
TRAINING_DATA = {
    "diffvqa": "MIMIC-Diff-VQA (MIMIC-CXR studies)",
    "vqa": "MIMIC-CXR question-answer pairs",
    "captioning": "MIMIC-CXR reports",
    "vision-encoder": "MIMIC-CXR reports (captioning objective)",
    "coca-vision-encoder": "LAION-2B image-text pairs, then MSCOCO captions (by the open_clip authors)",
    "detection": "VinDr-CXR (radiologist-annotated boxes)",
}
TASK_TAGS = {
    "diffvqa": ["visual-question-answering", "differential-vqa"],
    "vqa": ["visual-question-answering"],
    "captioning": ["radiology-report-generation", "image-captioning"],
    "vision-encoder": ["feature-extraction", "vision-transformer"],
    "coca-vision-encoder": ["feature-extraction", "vision-transformer", "coca", "open_clip"],
    "detection": ["object-detection", "vindr-cxr", "detr"],
}
DATASET_IDS = {
    "diffvqa": ["mimic-diff-vqa", "mimic-cxr"],
    "vqa": ["mimic-cxr"],
    "captioning": ["mimic-cxr"],
    "vision-encoder": ["mimic-cxr"],
    "coca-vision-encoder": ["laion/laion2B-en", "mscoco"],
    "detection": ["vindr-cxr"],
}

IMAGES = "# Images: PNG or JPEG (8 or 16 bit) or DICOM paths (DICOM needs pydicom), PIL images or arrays."
ENCODER_NOTE = (
    "# The pipeline loads the frozen {encoder} encoder from its own repo (once; the Hugging Face cache serves it "
    "offline)."
)
DATASET_TAGS = {"coca-vision-encoder": []}  # not trained on chest X-rays
# The weights' own licence: the LAPVQA heads are the collection's; CoCa's image tower is open_clip's (MIT).
LICENSES = {"coca-vision-encoder": "mit"}

USAGE = {
    "diffvqa": """from transformers import pipeline

{encoder_note}
pipe = pipeline(model="{repo_id}", trust_remote_code=True)
{images}
question = "what has changed compared to the reference image?"
print(pipe({{"prior_image": "prior.png", "current_image": "current.png", "question": question}}, max_new_tokens=64))""",
    "vqa": """from transformers import pipeline

{encoder_note}
pipe = pipeline(model="{repo_id}", trust_remote_code=True)
{images}
print(pipe({{"image": "chest_xray.png", "question": "is there a pleural effusion?"}}, max_new_tokens=32))""",
    "captioning": """from transformers import pipeline

pipe = pipeline(model="{repo_id}", trust_remote_code=True)
{images}
print(pipe("chest_xray.png", max_new_tokens=128)[0]["generated_text"])""",
    "vision-encoder": """from transformers import AutoImageProcessor, AutoModel

repo = "{repo_id}"
image_processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
encoder = AutoModel.from_pretrained(repo, trust_remote_code=True)

pixel_values = image_processor("chest_xray.png")["pixel_values"]  # PNG/JPEG or DICOM
patch_tokens = encoder(pixel_values).last_hidden_state  # [1, num_patches, 1024], CLS dropped
print(patch_tokens.shape)""",
    "coca-vision-encoder": """from transformers import AutoImageProcessor, AutoModel
from PIL import Image

repo = "{repo_id}"
image_processor = AutoImageProcessor.from_pretrained(repo)  # open_clip's evaluation transform
encoder = AutoModel.from_pretrained(repo, trust_remote_code=True)

pixel_values = image_processor(Image.open("chest_xray.png").convert("RGB"), return_tensors="pt")["pixel_values"]
outputs = encoder(pixel_values)
print(outputs.last_hidden_state.shape)  # [1, 255, 768]: the tokens the LAPVQA CoCa heads take
print(outputs.image_embeds.shape)  # [1, 768]: CoCa's contrastive image embedding""",
    "detection": """from transformers import pipeline

{encoder_note}
pipe = pipeline(model="{repo_id}", trust_remote_code=True)
{images}
for finding in pipe("chest_xray.png", threshold=0.1):  # boxes in the original image's pixels
    print(finding["label"], round(finding["score"], 2), finding["box"])""",
}


def usage_snippet(entry: CollectionModel) -> str:
    encoder_note = ENCODER_NOTE.format(encoder=entry.encoder_label)
    return USAGE[entry.kind].format(repo_id=entry.repo_id, encoder_note=encoder_note, images=IMAGES)


def assumptions_of(conversion_info: dict) -> list[str]:
    """The recorded assumptions: the free-text ones, then the assumed option values (`assumed_<option>`)."""
    listed = list(conversion_info.get("assumptions", ["(converted without recorded assumptions)"]))
    options = [
        f"`{key.removeprefix('assumed_')}` = `{value}`"
        for key, value in conversion_info.items()
        if key.startswith("assumed_")
    ]
    return listed + [f"option {option} (not in the weights; a converter option)" for option in options]


def card_data(entry: CollectionModel) -> ModelCardData:
    """The YAML metadata the Hub reads: license, library, pipeline, tags, base model, datasets, model-index."""
    eval_results = [
        EvalResult(
            task_type=entry.pipeline_tag,
            dataset_type=entry.dataset.type,
            dataset_name=entry.dataset.name,
            dataset_split=entry.dataset.split,
            metric_type=metric.type,
            metric_name=metric.name,
            metric_value=metric.value,
            source_name="upstream model card",
            source_url=f"https://huggingface.co/{entry.source.repo_id}",
        )
        for metric in entry.results
    ]
    return ModelCardData(
        license=LICENSES.get(entry.kind, "apache-2.0"),
        library_name="transformers",
        pipeline_tag=entry.pipeline_tag,
        tags=[
            "chest-xray",
            "radiology",
            "medical-imaging",
            "lapvqa",
            *DATASET_TAGS.get(entry.kind, ["mimic-cxr"]),
            *TASK_TAGS[entry.kind],
        ],  # fmt: skip
        base_model=entry.source.repo_id,
        datasets=DATASET_IDS[entry.kind],
        model_name=entry.name,
        eval_results=eval_results or None,
    )


def render_model_card(
    entry: CollectionModel,
    collection: Collection,
    conversion_info: dict | None = None,
    verify_summary: str | None = None,
    training_results: dict | None = None,
) -> ModelCard:
    """The card of a converted repo; `conversion_info` is the converted `config.json`'s record of assumptions and
    `training_results` the upstream checkpoint's own training record (detection heads: epoch, validation mAP)."""
    if entry.kind not in USAGE:
        raise ValueError(f"{entry.repo_id}: no model class converts {entry.kind!r} checkpoints yet, so it has no card.")
    conversion_info = conversion_info or {}
    template = resources.files("lapvqa_hf.model_cards").joinpath("model_card.md").read_text()
    return ModelCard.from_template(
        card_data(entry),
        template_str=template,
        title=f"LAPVQA — {entry.name}",
        description=DESCRIPTIONS[entry.kind].format(encoder=entry.encoder_label),
        namespace=collection.namespace,
        source_repo=entry.source.repo_id,
        source_file=entry.source.filename,
        source_sha256=conversion_info.get("source_sha256"),
        verify_summary=verify_summary or "see `lapvqa convert` output",
        usage=usage_snippet(entry),
        results=entry.results,
        dataset_name=entry.dataset.name,
        dataset_split=entry.dataset.split,
        assumptions=assumptions_of(conversion_info),
        transformers_tested=conversion_info.get("transformers_versions_tested"),
        converted_with_transformers=conversion_info.get("converted_with_transformers"),
        training_results=training_results or {},
        training_data=TRAINING_DATA[entry.kind],
        kind=entry.kind,
    )


__all__ = ["card_data", "render_model_card", "usage_snippet"]
