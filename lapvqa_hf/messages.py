"""How the package words what it tells users: one-line errors, counted nouns, command-line summaries."""

import sys
from collections.abc import Callable


def summary(docstring: str) -> str:
    """A module's docstring's first paragraph on one line: what its command-line help describes it with."""
    return " ".join(docstring.strip().split("\n\n")[0].split())


def counted(number: int, singular: str, plural: str | None = None) -> str:
    """`1 layer`, `6 layers`: a count and its noun, for messages."""
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def first_line(error: BaseException) -> str:
    """An error's message cut to its first line (its type's name when it has none), for one-line reports."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def run_reporting_errors(
    command: Callable[[], object], errors: tuple[type[Exception], ...] = (ValueError, OSError)
) -> int:
    """Runs a command for the CLI: an expected error becomes one `error:` line (its first) and exit code 1."""
    try:
        command()
    except errors as error:
        print(f"error: {first_line(error)}", file=sys.stderr)
        return 1
    return 0


__all__ = ["counted", "first_line", "run_reporting_errors", "summary"]
