"""The LAPVQA Hub collection: one Transformers-native repo per upstream `.pt` file (`collection.json`, validated)."""

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .kinds import KINDS
from .models.encoders import ENCODER_WIDTHS


class ManifestError(ValueError):
    """The collection manifest is malformed; the message names the entry and the field."""


@dataclass(frozen=True)
class Metric:
    name: str
    type: str
    value: float
    approximate: bool = False


@dataclass(frozen=True)
class Source:
    repo_id: str
    filename: str
    filename_assumed: bool = False
    revision: str | None = None


@dataclass(frozen=True)
class Dataset:
    name: str
    type: str
    split: str


@dataclass(frozen=True)
class CollectionModel:
    repo_id: str
    kind: str
    convertible: bool
    source: Source
    encoder: str
    encoder_label: str
    dataset: Dataset
    results: tuple[Metric, ...] = field(default_factory=tuple)
    encoder_finetuned: bool = False  # trained with its encoder ("native" files): the file holds the head alone

    @property
    def name(self) -> str:
        return self.repo_id.split("/", 1)[1]

    @property
    def vis_dim(self) -> int:
        """The width of the encoder's patch tokens (`lapvqa_hf.models.encoders`)."""
        return ENCODER_WIDTHS[self.encoder]

    @property
    def pipeline_tag(self) -> str:
        return KINDS[self.kind].hub_pipeline_tag


@dataclass(frozen=True)
class Collection:
    namespace: str
    title: str
    models: tuple[CollectionModel, ...]

    def select(self, names: list[str] | None = None, convertible_only: bool = False) -> list[CollectionModel]:
        """The entries named (by repo id or name; all if none), refusing unknown names."""
        chosen = list(self.models)
        if names:
            by_name = {m.repo_id: m for m in self.models} | {m.name: m for m in self.models}
            unknown = [n for n in names if n not in by_name]
            if unknown:
                raise ManifestError(
                    f"not in the collection manifest: {unknown}; known: {[m.name for m in self.models]}"
                )
            chosen = [by_name[n] for n in names]
        return [m for m in chosen if m.convertible] if convertible_only else chosen


def _require(entry: dict, key: str, kind: type, where: str):
    if key not in entry:
        raise ManifestError(f"{where}: missing field {key!r}.")
    value = entry[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{where}: field {key!r} should be {kind.__name__}, found {type(value).__name__}.")
    return value


def _model_from_dict(entry: dict, index: int) -> CollectionModel:
    where = f"models[{index}] ({entry.get('repo_id', '?')})"
    repo_id = _require(entry, "repo_id", str, where)
    if repo_id.count("/") != 1:
        raise ManifestError(f"{where}: repo_id must be 'owner/name', found {repo_id!r}.")
    kind = _require(entry, "kind", str, where)
    if kind not in KINDS:
        raise ManifestError(f"{where}: kind must be one of {tuple(KINDS)}, found {kind!r}.")
    convertible = _require(entry, "convertible", bool, where)
    source = _require(entry, "source", dict, where)
    encoder = _require(entry, "encoder", str, where)
    if encoder not in ENCODER_WIDTHS:
        raise ManifestError(f"{where}: unknown encoder {encoder!r}; expected one of {sorted(ENCODER_WIDTHS)}.")
    results = []
    for j, metric in enumerate(_require(entry, "results", list, where)):
        value = _require(metric, "value", float, f"{where} results[{j}]")
        if not 0.0 <= value <= 1.0:
            raise ManifestError(f"{where} results[{j}]: value {value} outside [0, 1].")
        results.append(
            Metric(
                _require(metric, "name", str, f"{where} results[{j}]"),
                _require(metric, "type", str, f"{where} results[{j}]"),
                value,
                bool(metric.get("approximate", False)),
            )
        )
    dataset = _require(entry, "dataset", dict, where)
    encoder_finetuned = _require(entry, "encoder_finetuned", bool, where) if "encoder_finetuned" in entry else False
    return CollectionModel(
        repo_id=repo_id,
        kind=kind,
        convertible=convertible,
        source=Source(
            repo_id=_require(source, "repo_id", str, f"{where} source"),
            filename=_require(source, "filename", str, f"{where} source"),
            filename_assumed=bool(source.get("filename_assumed", False)),
            revision=source.get("revision"),
        ),
        encoder=encoder,
        encoder_label=_require(entry, "encoder_label", str, where),
        dataset=Dataset(*(_require(dataset, k, str, f"{where} dataset") for k in ("name", "type", "split"))),
        results=tuple(results),
        encoder_finetuned=encoder_finetuned,
    )


def load_collection(path: str | Path | None = None) -> Collection:
    """The manifest shipped with the package (or the one at `path`), validated."""
    if path is None:
        text = resources.files("lapvqa_hf").joinpath("collection.json").read_text()
    else:
        text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError(f"collection manifest is not valid JSON: {error}") from None
    header = _require(data, "collection", dict, "manifest")
    models = tuple(_model_from_dict(entry, i) for i, entry in enumerate(_require(data, "models", list, "manifest")))
    duplicates = sorted({m.repo_id for m in models if sum(n.repo_id == m.repo_id for n in models) > 1})
    if duplicates:
        raise ManifestError(f"repo ids listed twice: {duplicates}.")
    upstream = sorted({m.repo_id for m in models} & {m.source.repo_id for m in models})
    if upstream:
        raise ManifestError(f"converted repo ids that are upstream repos (a push would overwrite them): {upstream}.")
    sources = [(m.source.repo_id, m.source.filename) for m in models]
    if len(set(sources)) != len(sources):
        raise ManifestError("two entries convert the same upstream file.")
    return Collection(
        namespace=_require(header, "owner", str, "collection"),
        title=_require(header, "title", str, "collection"),
        models=models,
    )


__all__ = ["Collection", "CollectionModel", "ManifestError", "load_collection"]
