"""The transformers releases this code is tested on. Importing this module (`lapvqa_hf` does, before its other
modules) refuses a release older than the floor.

`.ci/run` runs the whole suite on the newest release pip resolves and the model, generation, conversion and
remote-code tests again on `TRANSFORMERS_OLDEST_TESTED`, the floor `pyproject.toml` declares. Converted folders
record both ends (and the release they were written with) in `config.json`'s `conversion_info`, and their cards
repeat it.
"""

import transformers
from packaging.version import Version

TRANSFORMERS_OLDEST_TESTED = "5.21.0"
TRANSFORMERS_NEWEST_TESTED = "5.25.0"


def require_supported_transformers(installed: str = transformers.__version__) -> None:
    """Refuses, in one line, a transformers release older than the floor. pip enforces the floor on install, but a
    checkout on `PYTHONPATH` or a `--no-deps` install does not, and older releases fail later with errors that do
    not name the cause (5.17: "AutoImageProcessor requires the Torchvision library")."""
    if Version(installed) < Version(TRANSFORMERS_OLDEST_TESTED):
        raise ImportError(
            f"lapvqa-hf needs transformers >= {TRANSFORMERS_OLDEST_TESTED}, but this Python has {installed}: "
            f"pip install 'transformers>={TRANSFORMERS_OLDEST_TESTED},<6'"
        )


require_supported_transformers()


def untested_release_note(installed: str | None = None) -> str | None:
    """A warning when the installed transformers is newer than the newest release this code was tested with (a
    release above the floor is allowed, and may well work), else None."""
    installed = installed or transformers.__version__
    if Version(installed) <= Version(TRANSFORMERS_NEWEST_TESTED):
        return None
    return (
        f"warning: transformers {installed} is newer than the newest release lapvqa-hf was tested with "
        f"({TRANSFORMERS_NEWEST_TESTED}); the folder records both (conversion_info), check its answers, or install "
        f"'transformers>={TRANSFORMERS_OLDEST_TESTED},<={TRANSFORMERS_NEWEST_TESTED}'."
    )


def transformers_record() -> dict[str, str]:
    """What a converted folder records about transformers: the tested range and the release that wrote it."""
    return {
        "transformers_versions_tested": f">={TRANSFORMERS_OLDEST_TESTED},<={TRANSFORMERS_NEWEST_TESTED}",
        "converted_with_transformers": transformers.__version__,
    }


__all__ = [
    "TRANSFORMERS_NEWEST_TESTED",
    "TRANSFORMERS_OLDEST_TESTED",
    "require_supported_transformers",
    "transformers_record",
    "untested_release_note",
]
