"""Users' tables (CSV with a header, or JSON Lines), read the same way by every command: `lapvqa answer`'s input,
`extract-features --pairs/--reports`, training and evaluation files.

Text is UTF-8 (with or without Excel's byte-order mark) or UTF-16 with a byte-order mark; anything else is refused in
one line naming the first bad byte. A CSV field may be of any length; a JSON line that does not parse, or is not an
object, is that row's problem, for the caller to report as it sees fit.
"""

import codecs
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

TABLE_SUFFIXES = (".csv", ".jsonl", ".json")


class TableError(ValueError):
    """A table that cannot be read at all; the message names the file and what was expected."""


@dataclass
class TableRow:
    """One row: its place (`index`, 0-based; `line` in the file), its values exactly as read (a dict, or what a JSON
    line held when it was no object), and why it could not be read (`problem`), if it could not."""

    index: int
    line: int
    values: object
    problem: str | None = None


def decode_text(data: bytes, path: Path) -> str:
    """A table's text: UTF-8 (with or without a byte-order mark) or UTF-16 with a byte-order mark."""
    encoding = "utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        raise TableError(
            f"{path}: not {encoding.removesuffix('-sig').upper()} text (byte {data[error.start]:#04x} at offset "
            f"{error.start}); save it as UTF-8."
        ) from None


def read_table(path: str | Path, required: tuple[str, ...] = ()) -> list[TableRow]:
    """The rows of a CSV or JSON Lines file. A missing or empty file, a CSV whose header lacks a `required` column,
    or text that is not UTF-8 / UTF-16 is refused with a `TableError`."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: no such file.")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise TableError(f"{path}: expected a .csv or .jsonl file, found {path.suffix or 'no suffix'}.")
    text = decode_text(path.read_bytes(), path)
    if not text.strip():
        raise TableError(f"{path}: no rows.")
    rows = _csv_rows(path, text, required) if suffix == ".csv" else _json_rows(text)
    if not rows:
        raise TableError(f"{path}: no rows.")
    return rows


def _csv_rows(path: Path, text: str, required: tuple[str, ...]) -> list[TableRow]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a long field is its row's business, not a crash
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        header = reader.fieldnames or []
        missing = [column for column in required if column not in header]
        if missing:
            raise TableError(
                f"{path}: needs the columns {list(required)}; the header has {header} ({missing} missing)."
            )
        for values in reader:
            values.pop(None, None)  # cells beyond the header's columns
            rows.append(TableRow(len(rows), reader.line_num, values))
    except csv.Error as error:
        raise TableError(f"{path} line {reader.line_num}: not CSV ({error}).") from None
    return rows


def _json_rows(text: str) -> list[TableRow]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON text may hold U+2028
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            values = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as error:
            reason = error.msg if isinstance(error, json.JSONDecodeError) else "nested too deeply"
            rows.append(TableRow(len(rows), number, line, f"line {number}: not JSON ({reason})"))
            continue
        problem = None if isinstance(values, dict) else f"expected a JSON object, found {type(values).__name__}"
        rows.append(TableRow(len(rows), number, values, problem))
    return rows


def is_valid_text(text: str) -> bool:
    """Whether UTF-8 can hold `text` (a JSON string may carry a lone surrogate, which it cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_problems(values: dict, columns: tuple[str, ...]) -> str | None:
    """Why `values` lacks usable text in `columns` (missing, empty, not text, not valid Unicode), or None."""
    problems = []
    for column in columns:
        value = values.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            problems.append(f"{column}: missing or empty")
        elif not isinstance(value, str):
            problems.append(f"{column}: expected text, found {type(value).__name__} {json.dumps(value)[:40]}")
        elif not is_valid_text(value):
            problems.append(f"{column}: not valid Unicode text (a lone surrogate)")
    return "; ".join(problems) or None


__all__ = ["TableError", "TableRow", "decode_text", "is_valid_text", "read_table", "text_problems"]
