"""Writing files and folders so that a kill at any moment leaves the old or the new, whole, and nothing of the user's
is ever replaced: atomic JSON writes, staged output folders, the user's umask permissions, and file hashes."""

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


class OutputFolderError(ValueError):
    """An output folder that may not be written; the message says why and what to do."""


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def with_umask_permissions(path: str | os.PathLike) -> None:
    """Gives a finished file, or a folder and all it holds, the permissions the user's umask gives new ones
    (`tempfile`'s folders and files, renamed into place, and some writers' files are private otherwise)."""
    mask = os.umask(0)
    os.umask(mask)
    path = Path(path)
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def write_json_atomically(path: Path, payload: object, temporary_prefix: str | None = None) -> None:
    """Writes JSON under a temporary name beside `path` (`temporary_prefix`, default `.NAME.`), then renames it over
    `path`: readers see the old file or the new one, whole. It gets the user's umask permissions."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix or f".{path.name}.")
    with os.fdopen(handle, "w") as file:
        json.dump(payload, file, indent=1)
    with_umask_permissions(temporary)
    os.replace(temporary, path)


def _remove_abandoned_staging(output: Path) -> None:
    """Staging and retired folders of `output` whose process is gone (a killed conversion) are removed."""
    for folder in output.parent.glob(f".{output.name}.*-pid*-*"):
        match = re.fullmatch(rf"\.{re.escape(output.name)}\.(tmp|old)-pid(\d+)-\w+", folder.name)
        if match is None or not folder.is_dir():
            continue
        try:
            os.kill(int(match.group(2)), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass


@contextlib.contextmanager
def atomic_output_dir(
    output: str | os.PathLike,
    overwrite: bool = False,
    source: str | os.PathLike | None = None,
    replaceable: tuple[Callable[[Path], bool], str] = (lambda folder: True, "a replaceable folder"),
) -> Iterator[Path]:
    """Yields an empty temporary folder beside `output` and moves it into place only if the block succeeds.

    On any error the temporary folder is removed and `output` is untouched; one left by a killed run is removed by
    the next. An existing, non-empty `output` is refused unless `overwrite`, and even then only when
    `replaceable[0](output)` says this tool wrote it (`replaceable[1]` describes such a folder, for the message); it
    is then replaced whole, never merged. `output` may not be, or hold, the `source` file. The result gets the user's
    umask permissions.
    """
    output = Path(output).absolute()
    if source is not None:
        source, target = Path(source).resolve(), output.resolve()
        if source == target or target in source.parents:
            raise OutputFolderError(
                f"--output {output} would replace the input {source}; write the output to another folder."
            )
    if output.exists():
        if not output.is_dir():
            raise OutputFolderError(f"{output} is a file; --output must be a folder (new, empty or {replaceable[1]}).")
        if any(output.iterdir()):
            if not overwrite:
                raise OutputFolderError(f"{output} already exists and is not empty; pass --overwrite to replace it.")
            if not replaceable[0](output):
                raise OutputFolderError(
                    f"{output} is not {replaceable[1]}; --overwrite replaces only those: choose another --output."
                )
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-pid{os.getpid()}-", dir=output.parent))
    try:
        yield staging
        with_umask_permissions(staging)
        if output.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-pid{os.getpid()}-", dir=output.parent))
            os.replace(output, retired / output.name)
            os.replace(staging, output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


__all__ = [
    "OutputFolderError",
    "atomic_output_dir",
    "sha256_of",
    "with_umask_permissions",
    "write_json_atomically",
]
