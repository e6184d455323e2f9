"""The test suite's own ground rules: it never touches the user's Hugging Face home, and it runs on the
transformers range the package declares."""

import importlib.metadata
import os
from pathlib import Path

import huggingface_hub.constants
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

from lapvqa_hf.compatibility import TRANSFORMERS_NEWEST_TESTED, TRANSFORMERS_OLDEST_TESTED


def test_hugging_face_caches_point_into_a_private_folder_per_test(private_hf_home, tmp_path):
    real_home = Path("~/.cache/huggingface").expanduser()
    assert os.environ["HF_HOME"] == str(private_hf_home) == huggingface_hub.constants.HF_HOME
    assert Path(huggingface_hub.constants.HF_HUB_CACHE).parent == private_hf_home
    assert not any(os.environ.get(name) for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"))
    for path in (private_hf_home, Path(transformers.utils.hub.HF_MODULES_CACHE)):
        assert real_home not in path.parents and path != real_home


def test_the_declared_transformers_floor_is_the_oldest_tested_release():
    (requirement,) = [
        Requirement(line)
        for line in importlib.metadata.requires("lapvqa-hf")
        if Requirement(line).name == "transformers" and not Requirement(line).marker
    ]
    floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    assert floors == [TRANSFORMERS_OLDEST_TESTED]
    assert Version(TRANSFORMERS_OLDEST_TESTED) <= Version(transformers.__version__)
    assert Version(TRANSFORMERS_OLDEST_TESTED) < Version(TRANSFORMERS_NEWEST_TESTED)
