"""JSON records (metrics, summaries, meta.json): the one reader with required keys, and finite-or-null numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from spinedxa.files import write_json_atomic


class RecordError(ValueError):
    """A JSON record is unreadable or lacks required keys (the message names the file and the keys)."""


def read(path: str | Path, required: Sequence[str] = ()) -> dict[str, Any]:
    """Read a JSON object and check that it holds ``required`` keys.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RecordError: not a JSON object, or keys are missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in required if k not in data]
    if missing:
        raise RecordError(f"{path}: missing key(s) {missing}")
    return data


def write(path: str | Path, record: dict[str, Any]) -> None:
    """Write ``record`` as indented, key-sorted JSON atomically (NaN is refused: use :func:`finite_or_none`)."""
    write_json_atomic(path, record)


def finite_or_none(value: Any) -> float | None:
    """``float(value)`` when finite, else None (JSON has no NaN; an undefined metric is ``null``)."""
    if value is None:
        return None
    x = float(value)
    return x if math.isfinite(x) else None
