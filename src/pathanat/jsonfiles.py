"""The JSON files pathanat writes (manifests, metrics, analyses, records): written strictly (NaN
and infinities as null, which JSON lacks) and atomically, and read back with one error that names
the file when it cannot be read -- a truncated copy, a disk error, someone's edit."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from pathanat.atomic import atomic_file
from pathanat.errors import InputError


def finite_or_none(value: Any) -> Any:
    """``value`` with NaN and infinities as None and numpy scalars as Python ones, recursively."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str | os.PathLike, content: dict) -> None:
    """``content`` as strict JSON (NaN and infinities as null), written aside and renamed."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(finite_or_none(content), indent=2) + "\n")


def read_json(path: str | os.PathLike, advice: str = "") -> dict:
    """The JSON object in ``path``; an ``InputError`` naming the file (and ``advice``, e.g. the
    command that rewrites it) when it is missing, unreadable, not JSON or not an object."""
    path = Path(path)
    tail = f"; {advice}" if advice else ""
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: not found{tail}") from None
    except (OSError, ValueError) as err:  # ValueError: bad JSON and bad UTF-8 alike
        reason = str(err).splitlines()[0][:120]
        raise InputError(f"{path}: not a readable JSON file ({reason}){tail}") from None
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(content).__name__}{tail}")
    return content
