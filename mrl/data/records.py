"""Reading JSONL records: file resolution, field checks, and the malformed-record policy.

A malformed record raises ``DataError`` ("path:line: what is wrong", then one line for each further
malformed record of the file: the whole file is read first, so one run reports every problem), or
with ``skip_malformed`` is skipped and recorded as a ``Skipped`` entry. Lines holding only whitespace are not records and
are passed over; every other line is either used or reported.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from mrl.data.config import BUILTIN_PREFIX

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_LISTED = 20  # malformed records listed in one DataError; the rest are counted

BUILTIN_DIR = Path(__file__).parent / "builtin"


class DataError(ValueError):
    """A malformed record or data file; ``str()`` is "path:line: reason" (or "path: reason")."""

    def __init__(self, path: str, line: Optional[int], reason: str) -> None:
        self.path, self.line, self.reason = path, line, reason
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {reason}")


class RecordError(Exception):
    """Raised by record converters with the reason only; the reader adds path and line."""


@dataclass(frozen=True)
class Skipped:
    """A record left out under skip_malformed."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def resolve_path(path: str) -> Path:
    """The file behind ``path``: 'builtin:<name>' maps to mrl/data/builtin/<name>.jsonl."""
    if path.startswith(BUILTIN_PREFIX):
        return BUILTIN_DIR / f"{path[len(BUILTIN_PREFIX):]}.jsonl"
    return Path(path).expanduser()


def read_jsonl(
    path: str,
    convert: Callable[[dict[str, Any]], T],
    *,
    skip_malformed: bool,
    max_records: Optional[int] = None,
) -> tuple[list[tuple[int, T]], list[Skipped]]:
    """Convert every record of a JSONL file; returns ([(line, item)], skipped).

    ``convert`` gets the parsed JSON object and raises ``RecordError`` for a malformed record.
    Raises ``DataError`` for a missing/unreadable file, malformed records (unless skipped; the
    error lists them all, up to ``MAX_LISTED``), or a file without any valid record.
    """
    file = resolve_path(path)
    if not file.is_file():
        raise DataError(str(file), None, "data file not found")
    items: list[tuple[int, T]] = []
    skipped: list[Skipped] = []
    for line_no, obj_or_error in _lines(file, max_records):
        try:
            if isinstance(obj_or_error, RecordError):
                raise obj_or_error
            items.append((line_no, convert(obj_or_error)))
        except RecordError as err:
            skipped.append(Skipped(str(file), line_no, str(err)))
    if skipped and not skip_malformed:
        first, rest = skipped[0], skipped[1:]
        more = [str(s) for s in rest[: MAX_LISTED - 1]]
        if len(rest) > len(more):
            more.append(f"... and {len(rest) - len(more)} more malformed records")
        raise DataError(str(file), first.line, "\n".join([first.reason, *more]))
    if skipped:
        logger.warning(
            "%s: skipped %d malformed record(s) (data.skip_malformed=true); first: %s",
            file, len(skipped), skipped[0],
        )
    if not items:
        reason = f"no valid records ({len(skipped)} skipped as malformed)" if skipped else "the file holds no records"
        raise DataError(str(file), None, reason)
    return items, skipped


def _lines(file: Path, max_records: Optional[int]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or RecordError) for every non-blank line."""
    count = 0
    with open(file, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if max_records is not None and count >= max_records:
                return
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                count += 1
                yield line_no, RecordError(f"invalid UTF-8 ({err.reason} at byte {err.start})")
                continue
            if not text.strip():
                continue
            count += 1
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                yield line_no, RecordError(f"invalid JSON: {err.msg} (column {err.colno})")
                continue
            if not isinstance(obj, dict):
                yield line_no, RecordError(f"a record must be a JSON object, got {type_name(obj)}")
                continue
            yield line_no, obj


# Field checks used by the record converters ---------------------------------------------------


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def get_str(record: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    """``record[key]`` as a string; missing, non-string or (unless allowed) empty is an error."""
    if key not in record:
        raise RecordError(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, got {type_name(value)}")
    if not allow_empty and not value:
        raise RecordError(f"field {key!r} is empty")
    return value


def get_list(record: dict[str, Any], key: str) -> list[Any]:
    """``record[key]`` as a non-empty JSON array."""
    if key not in record:
        raise RecordError(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, list):
        raise RecordError(f"field {key!r} must be an array, got {type_name(value)}")
    if not value:
        raise RecordError(f"field {key!r} is an empty array")
    return value


def check_number(value: Any, what: str) -> float:
    """A finite JSON number (booleans are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{what} must be a number, got {type_name(value)}")
    if not math.isfinite(value):
        raise RecordError(f"{what} must be finite, got {value}")
    return float(value)


def check_str(value: Any, what: str) -> str:
    """A non-empty string."""
    if not isinstance(value, str):
        raise RecordError(f"{what} must be a string, got {type_name(value)}")
    if not value:
        raise RecordError(f"{what} is empty")
    return value
