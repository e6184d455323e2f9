"""Hub model cards for the converted LAPVQA repos, rendered from `model_cards/model_card.md` with huggingface_hub."""

from importlib import resources

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .collection import Collection, CollectionModel
from .kinds import ENCODER_NOTE, HELD_ENCODER_NOTE, IMAGES_NOTE, KINDS, NATIVE_ENCODER_NOTE
from .models.encoders import RECIPES


def usage_snippet(entry: CollectionModel, holds_encoder: bool = False) -> str:
    """The card's usage code; `holds_encoder`: the converted folder holds its fine-tuned encoder."""
    note = HELD_ENCODER_NOTE if holds_encoder else NATIVE_ENCODER_NOTE if entry.encoder_finetuned else ENCODER_NOTE
    encoder_note = note.format(encoder=entry.encoder_label)
    card = KINDS[entry.kind].card
    return card.usage.format(repo_id=entry.repo_id, encoder_note=encoder_note, images=IMAGES_NOTE)


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
    card = KINDS[entry.kind].card
    return ModelCardData(
        license=card.license,
        library_name="transformers",
        pipeline_tag=entry.pipeline_tag,
        tags=[
            "chest-xray",
            "radiology",
            "medical-imaging",
            "lapvqa",
            *card.dataset_tags,
            *card.task_tags,
        ],  # fmt: skip
        base_model=entry.source.repo_id,
        datasets=list(card.datasets),
        model_name=entry.name,
        eval_results=eval_results or None,
    )


def render_model_card(
    entry: CollectionModel,
    collection: Collection,
    conversion_info: dict | None = None,
    verify_summary: str | None = None,
    training_results: dict | None = None,
    holds_encoder: bool = False,
) -> ModelCard:
    """The card of a converted repo; `conversion_info` is the converted `config.json`'s record of assumptions,
    `training_results` the upstream checkpoint's own training record (detection heads: epoch, validation mAP), and
    `holds_encoder` whether the folder holds its fine-tuned encoder (a native file that held it)."""
    if entry.kind not in KINDS:
        raise ValueError(f"{entry.repo_id}: no model class converts {entry.kind!r} checkpoints yet, so it has no card.")
    card = KINDS[entry.kind].card
    conversion_info = conversion_info or {}
    template = resources.files("lapvqa_hf.model_cards").joinpath("model_card.md").read_text()
    return ModelCard.from_template(
        card_data(entry),
        template_str=template,
        title=f"LAPVQA — {entry.name}",
        description=card.description.format(encoder=entry.encoder_label),
        namespace=collection.namespace,
        source_repo=entry.source.repo_id,
        source_file=entry.source.filename,
        source_sha256=conversion_info.get("source_sha256"),
        verify_summary=verify_summary or "see `lapvqa convert` output",
        usage=usage_snippet(entry, holds_encoder),
        results=entry.results,
        dataset_name=entry.dataset.name,
        dataset_split=entry.dataset.split,
        assumptions=assumptions_of(conversion_info),
        transformers_tested=conversion_info.get("transformers_versions_tested"),
        converted_with_transformers=conversion_info.get("converted_with_transformers"),
        training_results=training_results or {},
        training_data=card.training_data,
        kind=entry.kind,
        encoder_finetuned=entry.encoder_finetuned,
        holds_encoder=holds_encoder,
        converter_command=KINDS[entry.kind].command,
        encoder_label=entry.encoder_label,
        encoder_class=RECIPES[entry.encoder].model_class,
        repo_id=entry.repo_id,
    )


__all__ = ["card_data", "render_model_card", "usage_snippet"]
