"""A model kind is one object: registering one `ModelKind` gives a new kind everything the package offers (Auto
classes, a pipeline, `lapvqa answer`'s columns, a model card, a converter subcommand), with no other file touched."""

import argparse
import json
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel, pipeline

from lapvqa_hf import KINDS, ModelKind, register_kind
from lapvqa_hf.answer import answerable_kind, read_input
from lapvqa_hf.cli import build_parser
from lapvqa_hf.collection import Collection, CollectionModel, Dataset, Source
from lapvqa_hf.kinds import Answering, CardText, kind_of, save_pretrained_with_pipeline
from lapvqa_hf.model_card import render_model_card
from lapvqa_hf.models.pipeline_lapvqa import LapvqaPipeline


@strict
class ToyConfig(PreTrainedConfig):
    model_type = "lapvqa_toy"
    width: int = 4


class ToyModel(PreTrainedModel):
    config: ToyConfig
    main_input_name = "image_features"

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.scale = nn.Linear(config.width, 1)
        self.post_init()

    def forward(self, image_features: torch.Tensor):
        return SimpleNamespace(score=self.scale(image_features).mean(dim=(1, 2)))


class ToyPipeline(LapvqaPipeline):
    _load_tokenizer = False
    _load_image_processor = False
    _load_processor = False
    _load_feature_extractor = False

    def _sanitize_parameters(self, **kwargs):
        return {}, {}, {}

    def preprocess(self, inputs):
        return {"image_features": torch.as_tensor(inputs["image"], dtype=torch.float32)[None]}

    def _forward(self, model_inputs):
        return {"score": self.model(**model_inputs).score}

    def postprocess(self, model_outputs):
        return {"score": model_outputs["score"].item()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint")
    parser.add_argument("--output", required=True)


def run(args: argparse.Namespace) -> int:
    model = ToyModel(ToyConfig(width=len(torch.load(args.checkpoint, weights_only=True)["scale.weight"][0])))
    save_pretrained_with_pipeline(model, args.output)
    return 0


TOY_CONVERTER = SimpleNamespace(__doc__="Convert a toy checkpoint.", add_arguments=add_arguments, run=run)
TOY = ModelKind(
    name="toy",
    model_type="lapvqa_toy",
    config_class=ToyConfig,
    model_class=ToyModel,
    image_processor=False,
    pipeline_task="lapvqa-toy",
    pipeline_class=ToyPipeline,
    hub_pipeline_tag="image-classification",
    answering=Answering(columns=("image", "note"), images={"image": "image_features"}, field="score"),
    converter=TOY_CONVERTER,
    converter_help="a toy checkpoint",
    card=CardText(
        description="A toy over the {encoder} encoder.",
        training_data="nothing",
        task_tags=("toy",),
        datasets=("none",),
        usage='from transformers import pipeline\n\npipe = pipeline(model="{repo_id}", trust_remote_code=True)',
    ),
)


@pytest.fixture
def toy_kind():
    register_kind(TOY)
    yield TOY
    del KINDS[TOY.name]


def test_a_registered_kind_loads_with_the_auto_classes_and_its_pipeline(toy_kind, tmp_path):
    assert KINDS["toy"] is toy_kind and kind_of("lapvqa_toy") is toy_kind
    model = ToyModel(ToyConfig())
    save_pretrained_with_pipeline(model, tmp_path / "toy")
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert config["custom_pipelines"] == {"lapvqa-toy": {"impl": "test_kinds.ToyPipeline", "pt": ["AutoModel"]}}
    assert type(AutoConfig.from_pretrained(tmp_path / "toy")) is ToyConfig
    assert type(AutoModel.from_pretrained(tmp_path / "toy")) is ToyModel
    pipe = pipeline("lapvqa-toy", model=ToyModel(ToyConfig()))  # transformers' pipeline registry knows the task
    assert type(pipe) is ToyPipeline and set(pipe({"image": [[1.0, 2.0, 3.0, 4.0]]})) == {"score"}


def test_a_registered_kind_gets_answer_columns_a_card_and_a_converter_command(toy_kind, tmp_path, capsys):
    assert answerable_kind("toy-folder", "lapvqa_toy").answering.columns == ("image", "note")
    (tmp_path / "rows.csv").write_text("image,note\na.png,first\n")
    (row,) = read_input(tmp_path / "rows.csv", toy_kind.answering.columns)
    assert row.values == {"image": "a.png", "note": "first"} and row.problem is None

    entry = CollectionModel(
        repo_id="dmusingu/lapvqa-toy", kind="toy", convertible=True, source=Source("dmusingu/toy", "toy.pt"),
        encoder="coca", encoder_label="CoCa ViT-L/14", dataset=Dataset("None", "none", "test"),
    )  # fmt: skip
    card = render_model_card(entry, Collection("dmusingu", "LAPVQA", (entry,)))
    assert "A toy over the CoCa ViT-L/14 encoder." in card.text and card.data.pipeline_tag == "image-classification"
    assert card.data.tags[-1] == "toy" and 'pipeline(model="dmusingu/lapvqa-toy"' in card.text

    parser = build_parser()
    torch.save({"scale.weight": torch.zeros(1, 3)}, tmp_path / "toy.pt")
    args = parser.parse_args(["convert", "toy", str(tmp_path / "toy.pt"), "--output", str(tmp_path / "out")])
    assert args.handler(args) == 0
    assert AutoConfig.from_pretrained(tmp_path / "out").width == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "--help"])
    assert "a toy checkpoint" in capsys.readouterr().out


def test_every_kind_of_the_collection_is_one_registered_object():
    assert list(KINDS) == [
        "diffvqa",
        "vqa",
        "captioning",
        "vision-encoder",
        "coca-vision-encoder",
        "detection",
        "two-tower",
        "report-generation",
        "grounding",
    ]
    for kind in KINDS.values():
        assert kind_of(kind.model_type) is kind
        assert kind.converter_module().convert_entry and kind.card.usage
        assert (kind.answering is None) == (kind.pipeline_class is None)
