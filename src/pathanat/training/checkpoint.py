"""Checkpoint files: written aside then renamed, read back with ``torch.load(weights_only=True)``.

Lightning's own writer serialises to memory and then overwrites the destination in place, so a
kill during that write leaves a truncated ``last.ckpt``. Here the bytes go to a temporary file in
the same folder, which replaces the destination (``os.replace``) only once complete.

Checkpoints hold tensors and plain Python types only (the experiment config is stored as a plain
mapping), so they load without unpickling arbitrary objects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pathanat.atomic import atomic_file
from pathanat.errors import PathanatError
from pathanat.runs import load_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``.NAME.*.tmp-write`` then rename; load with ``weights_only=True``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(path, map_location)



def newest_intact_checkpoint(folder: Path) -> Path | None:
    """The newest step checkpoint in ``folder`` that loads, or None."""
    for path in sorted(folder.glob("step*.ckpt"), reverse=True):
        try:
            load_checkpoint(path)
        except PathanatError:
            continue
        return path
    return None
