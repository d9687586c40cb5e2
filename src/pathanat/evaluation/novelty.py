"""Whether draws are new slices or copies of training slices: a data-copying test.

Each draw's distance to its nearest training reconstruction is set against the same distance of
held-out reconstructions (the test split's). A sampler that draws new slices from the data's
distribution puts its draws as far from the training set as new real slices are: a distance
ratio near 1, and about 5% of draws nearer than the 5th percentile of the held-out distances. One
that copies training slices puts them nearer: ratio towards 0, near copies towards 1. Both sides
are decoded images (likelihood means), so the decoder's smoothing is common to them. The idea is
the nearest-neighbour test of Meehan, Chaudhuri & Dasgupta (2020), "A non-parametric test to
detect data-copying in generative models".
"""

from __future__ import annotations

import numpy as np
import torch

from pathanat.errors import InputError

NEAR = 0.05  # a draw is a near copy when nearer than this quantile of the held-out distances


def nearest_distances(images: np.ndarray, training: np.ndarray, batch: int = 256) -> np.ndarray:
    """Euclidean distance of each image (N, ...) to its nearest image of ``training`` (M, ...)."""
    if images.shape[1:] != training.shape[1:]:
        raise InputError(f"images: expected {tuple(training.shape[1:])} like the training "
                         f"images, got {tuple(images.shape[1:])}")
    pool = torch.as_tensor(np.asarray(training, dtype=np.float32)).flatten(1)
    flat = torch.as_tensor(np.asarray(images, dtype=np.float32)).flatten(1)
    return torch.cat([torch.cdist(part, pool).min(1).values
                      for part in flat.split(batch)]).numpy().astype(np.float64)


def copy_test(draws: np.ndarray, held_out: np.ndarray, training: np.ndarray) -> dict:
    """``distance_ratio``: median nearest-training distance of the draws over that of the
    held-out images; ``near_copies``: the fraction of draws nearer to a training image than
    ``NEAR`` of the held-out images are (``NEAR`` for new data)."""
    if min(len(draws), len(held_out), len(training)) < 1:
        raise InputError("copy_test: expected at least one draw, held-out and training image")
    drawn = nearest_distances(draws, training)
    reference = nearest_distances(held_out, training)
    return {
        "distance_ratio": float(np.median(drawn) / np.median(reference)),
        "near_copies": float(np.mean(drawn < np.quantile(reference, NEAR))),
        "draws": len(draws), "held_out": len(held_out), "training": len(training),
    }
