"""The test suite's own ground rules: it never touches the user's Hugging Face home, and it runs on the
transformers range the package declares."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

from lapvqa_hf.compatibility import (
    TRANSFORMERS_NEWEST_TESTED,
    TRANSFORMERS_OLDEST_TESTED,
    require_supported_transformers,
)


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


def test_a_transformers_release_below_the_floor_is_refused_in_one_line():
    with pytest.raises(
        ImportError, match=r"^lapvqa-hf needs transformers >= 5\.21\.0, but this Python has 5\.17\.0: pip"
    ):
        require_supported_transformers("5.17.0")
    require_supported_transformers(TRANSFORMERS_OLDEST_TESTED)
    require_supported_transformers(TRANSFORMERS_NEWEST_TESTED)


def test_importing_the_package_checks_the_release_before_anything_else():
    """pip enforces the floor, a checkout on PYTHONPATH does not: 5.17 used to fail with "AutoImageProcessor requires
    the Torchvision library", which hides the cause."""
    code = (  # transformers.pipelines puts a fresh module object in sys.modules: patch that one
        "import sys, transformers.pipelines; sys.modules['transformers'].__version__ = '5.17.0'; import lapvqa_hf"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert found.returncode != 0
    assert found.stderr.strip().splitlines()[-1] == (
        "ImportError: lapvqa-hf needs transformers >= 5.21.0, but this Python has 5.17.0: "
        "pip install 'transformers>=5.21.0,<6'"
    )


def test_a_conversion_on_a_transformers_newer_than_tested_says_so(tmp_path, capsys, monkeypatch):
    from test_convert_diffvqa import run_cli, write_head

    from lapvqa_hf import compatibility

    assert compatibility.untested_release_note(TRANSFORMERS_NEWEST_TESTED) is None
    newer = f"{Version(TRANSFORMERS_NEWEST_TESTED).major}.{Version(TRANSFORMERS_NEWEST_TESTED).minor + 1}.0"
    # The module object the package reads: importing transformers.pipelines (any earlier test in this worker may
    # have) puts a fresh `transformers` module object in sys.modules, so a plain `import transformers` here can
    # name another one.
    monkeypatch.setattr(compatibility.transformers, "__version__", newer)
    write_head(tmp_path / "coca_best.pt", nhead=4)
    assert (
        run_cli(tmp_path / "coca_best.pt", "--encoder", "coca", "--num-heads", "4", "--output", tmp_path / "out") == 0
    )
    assert f"warning: transformers {newer} is newer than the newest release lapvqa-hf was tested with" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize("arguments", [[], ["--help"], ["--version"], ["--no-such-option"]])
def test_lapvqa_help_and_version_answer_without_importing_torch_or_transformers(arguments):
    code = (
        "import sys, lapvqa_cli\n"
        "try:\n    lapvqa_cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted({'torch', 'transformers', 'lapvqa_hf'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    found = subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert ("usage: lapvqa" in found.stdout + found.stderr) or found.stdout.startswith("lapvqa-hf ")
