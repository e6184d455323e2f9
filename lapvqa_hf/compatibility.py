"""The transformers releases this code is tested on.

`.ci/run` runs the whole suite on the newest release pip resolves and the model, generation, conversion and
remote-code tests again on `TRANSFORMERS_OLDEST_TESTED`, the floor `pyproject.toml` declares. Converted folders
record both ends (and the release they were written with) in `config.json`'s `conversion_info`, and their cards
repeat it.
"""

import transformers

TRANSFORMERS_OLDEST_TESTED = "5.21.0"
TRANSFORMERS_NEWEST_TESTED = "5.24.0"


def transformers_record() -> dict[str, str]:
    """What a converted folder records about transformers: the tested range and the release that wrote it."""
    return {
        "transformers_versions_tested": f">={TRANSFORMERS_OLDEST_TESTED},<={TRANSFORMERS_NEWEST_TESTED}",
        "converted_with_transformers": transformers.__version__,
    }


__all__ = ["TRANSFORMERS_NEWEST_TESTED", "TRANSFORMERS_OLDEST_TESTED", "transformers_record"]
