"""Reading the JSON files pathanat writes (manifests, metrics, analyses, records), with one error
that names the file when it cannot be read -- a truncated copy, a disk error, someone's edit."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pathanat.errors import InputError


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
