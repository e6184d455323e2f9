"""Transformers' own common model and config tests, fetched for the installed release (not copied into this repo).

The transformers sdist ships `tests/test_modeling_common.py` (`ModelTesterMixin`) and
`tests/test_configuration_common.py` (`ConfigTester`), but not the three modules they import from their test tree:
the export and generation mixins (empty stand-ins here: generation is covered by our own tests) and
`config_common_kwargs` (non-default values for `PreTrainedConfig`'s common fields). The files are unpacked once per
transformers version into `$LAPVQA_TRANSFORMERS_TESTS` (default: the system temp folder), never into the repo or
the user's home.
"""

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_common"
_SOURCES = ("tests/test_modeling_common.py", "tests/test_configuration_common.py")
_STAND_INS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": """config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
""",
}


def _fetch(version: str, destination: Path) -> None:
    """Downloads transformers' sdist with pip and unpacks the common tests plus stand-ins, atomically."""
    parent = destination.parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as staging:
        staging = Path(staging)
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        result = subprocess.run(
            [*command, f"transformers=={version}", "-d", str(staging)], capture_output=True, text=True
        )
        archives = list(staging.glob("transformers-*.tar.gz"))
        if result.returncode or not archives:
            raise RuntimeError(
                f"Could not download the transformers {version} sdist for its common tests "
                f"({result.stderr.strip().splitlines()[-1:]}); set LAPVQA_TRANSFORMERS_TESTS to a folder holding "
                f"{PACKAGE}/test_modeling_common.py, or run with access to PyPI."
            )
        package = staging / "tree" / PACKAGE
        with tarfile.open(archives[0]) as archive:
            for source in _SOURCES:
                member = archive.getmember(f"transformers-{version}/{source}")
                target = package / Path(source).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())
        for relative, text in {"__init__.py": "", **_STAND_INS}.items():
            target = package / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            (target.parent / "__init__.py").touch()
        try:
            (staging / "tree").rename(destination)
        except OSError:
            if not (destination / PACKAGE).is_dir():  # another test process finished first
                raise


def import_common(module: str):
    """`transformers_common.<module>` for the installed transformers version, fetched on first use."""
    version = transformers.__version__
    root = Path(os.environ.get("LAPVQA_TRANSFORMERS_TESTS", Path(tempfile.gettempdir()) / "lapvqa-transformers-tests"))
    destination = root / version
    if not (destination / PACKAGE / "test_modeling_common.py").is_file():
        _fetch(version, destination)
    if str(destination) not in sys.path:
        sys.path.insert(0, str(destination))
    return importlib.import_module(f"{PACKAGE}.{module}")
