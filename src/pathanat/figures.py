"""Figures a user looks at: montages of prepared slices, reconstructions and samples."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to files; no screen is assumed
import matplotlib.pyplot as plt
import numpy as np

from pathanat.atomic import atomic_file


def display(slice_xy: np.ndarray) -> np.ndarray:
    """A RAS-ordered (x, y) slice in display order: anterior up, patient's left on the left."""
    return np.flipud(np.asarray(slice_xy).T)


WINDOW = (-2.5, 3.5)  # standardised intensities every slice figure shows: background to lesions


def slice_montage(
    images: Sequence[np.ndarray],
    lesions: Sequence[np.ndarray] | None = None,
    titles: Sequence[str] | None = None,
    columns: int = 8,
    vrange: tuple[float, float] = WINDOW,
) -> plt.Figure:
    """A grid of axial slices (standardised intensities), with lesion outlines in red if given."""
    n = len(images)
    columns = min(columns, n)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(display(images[i]), cmap="gray", vmin=vrange[0], vmax=vrange[1])
        if lesions is not None and np.any(lesions[i]):
            ax.contour(
                display(lesions[i]).astype(float), levels=[0.5], colors="red", linewidths=0.6
            )
        if titles is not None:
            ax.set_title(titles[i], fontsize=6)
    fig.tight_layout()
    return fig


def caption_path(figure: str | os.PathLike) -> Path:
    """Where a figure's one-line caption lives: beside it, same name, ``.txt``."""
    return Path(figure).with_suffix(".txt")


def save_figure(
    fig: plt.Figure, path: str | os.PathLike, caption: str | None = None, dpi: int = 150
) -> None:
    """Write a figure as PNG atomically (and its caption beside it) and release its memory."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    if caption is not None:
        with atomic_file(caption_path(path)) as tmp:
            Path(tmp).write_text(" ".join(caption.split()) + "\n")
