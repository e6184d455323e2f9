"""Folders written by lapvqa-hf 0.4 load unchanged with this release's classes and give the same outputs.

`tests/fixtures/lapvqa-hf-0.4.tar.gz` holds tiny folders of every model kind as release 0.4.0 saved them (its
`save_pretrained_with_pipeline`: config, weights, generation config, the model code it shipped), with the outputs
0.4.0 computed on fixed inputs (`expected_outputs.safetensors`). An archive, so that the old release's code files
are not mistaken for this one's.
"""

import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

ARCHIVE = Path(__file__).parent / "fixtures" / "lapvqa-hf-0.4.tar.gz"
KINDS = ["captioning", "coca", "detection", "diffvqa", "vision", "vqa"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("release-0.4")
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(root, filter="data")
    return root / "lapvqa-hf-0.4"


def test_every_kind_of_the_release_has_a_fixture(folders):
    assert sorted(path.name for path in folders.iterdir()) == KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_a_folder_of_release_0_4_loads_with_this_releases_classes_and_answers_the_same(folders, kind):
    folder = folders / kind
    config = AutoConfig.from_pretrained(folder)
    assert type(config).__module__.startswith("lapvqa_hf."), "the package's class, not the folder's code"
    model = AutoModel.from_pretrained(folder).eval()
    assert type(model).__module__.startswith("lapvqa_hf.")
    recorded = load_file(folder / "expected_outputs.safetensors")
    inputs = {key.removeprefix("input."): value for key, value in recorded.items() if key.startswith("input.")}
    with torch.no_grad():
        outputs = model(**inputs)
    expected = {key.removeprefix("output."): value for key, value in recorded.items() if key.startswith("output.")}
    assert expected
    for name, value in expected.items():
        torch.testing.assert_close(getattr(outputs, name), value, rtol=1e-5, atol=1e-5)
