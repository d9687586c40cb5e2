"""Sample plausibility: is a generated slice a brain?

Two tests that need no trained network, both against the cache's real training slices; a slice is
brain-like when it passes both:

- outline: the slice's foreground (Otsu threshold, holes filled, largest connected component) must
  overlap the brain mask of some training slice with Dice >= ``BRAIN_LIKE_DICE``. White noise and a
  mean brain shifted off the cohort's brain positions fail it. It is not enough alone: on a cohort
  whose brains share one outline, a blurred rounded box of about the brain's extent reaches Dice
  0.96 (measured: the decoded prior means of a 600-step nvmp), so
- interior structure: inside the foreground eroded by ``EROSION`` pixels (clear of the outline's
  own edge), the slice's band-pass image (difference of Gaussians, sigma ``BAND`` pixels, of the
  FID window) must correlate with some training slice's over the same pixels at least
  ``STRUCTURE_FRACTION`` times as well as the median real *validation* slice does (the cohort's
  own scale, from held-out real slices). The band holds ventricle walls, sulci and the grey/white
  border. Measured on the 60-subject phantom (96 x 112, 2 mm; threshold 0.61), 1st-95th
  percentiles of the score: real test slices 0.81-0.94, the same blurred with sigma 2 px
  0.75-0.84 and 3 px 0.62-0.70, noise of sigma 0.5 added 0.79-0.91; a real outline filled with
  its mean intensity and blurred 0.18-0.53, or with a mottled texture 0.04-0.17; the prior draws
  of a short run whose priors decoded to blurred boxes 0.07-0.27.

The fraction of brain-like slices is a binomial proportion for i.i.d. prior draws (Wilson interval)
and a subject-clustered mean for real slices (subject bootstrap), so both rows carry an honest 95%
interval; the real test slices are the reference row.

Brain-like says nothing about variety: a model that draws one brain over and over passes it.
``shape_diversity`` (mean pairwise 1 - Dice of the slices' foregrounds) says how much the shapes
differ; the real slices' value, over subjects and slice levels, is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats
from skimage.filters import threshold_otsu

from pathanat.data.prepare import Cache
from pathanat.errors import InputError
from pathanat.evaluation.fid import FID_WINDOW
from pathanat.metrics import as_slices, mean_ci

BRAIN_LIKE_DICE = 0.9
# difference of Gaussians (pixels): finer than the blur of a reconstruction, coarser than noise
BAND = (1.0, 3.0)
EROSION = 9  # 3 x the band's wider sigma: the outline's edge leaves no trace in the band inside
STRUCTURE_FRACTION = 0.7
CONFIDENCE = 0.95
DIVERSITY_SLICES = 512  # pairs grow as N^2; a fixed-seed subset of this many beyond it
TEST = (f"brain-like: Otsu foreground (holes filled, largest component) with best Dice >= "
        f"{BRAIN_LIKE_DICE} against the training slices' brain masks, and band-pass structure "
        f"(DoG sigma {BAND[0]:g}/{BAND[1]:g} px, inside the foreground eroded by {EROSION} px) "
        f"correlating with some training slice's at least {STRUCTURE_FRACTION:g} x as well as the "
        f"median real validation slice's")


@dataclass(frozen=True)
class References:
    """What real brains look like in one cache: the training split's brain masks (M, H, W), their
    slices' band-pass images (M, H * W), and the structure threshold."""

    masks: np.ndarray
    bands: np.ndarray
    structure_threshold: float


def structure_bands(images: np.ndarray) -> np.ndarray:
    """Band-pass images (N, H * W), float32, of slices (N, H, W) clipped to the FID window."""
    images = np.clip(as_slices("images", images).astype(np.float32), *FID_WINDOW)
    return np.stack([ndimage.gaussian_filter(im, BAND[0]) - ndimage.gaussian_filter(im, BAND[1])
                     for im in images]).reshape(len(images), -1)


def best_structure(
    images: np.ndarray, masks: np.ndarray, bands: np.ndarray, chunk: int = 256
) -> np.ndarray:
    """For each slice, the highest correlation (uncentred: the band has no mean to remove) of its
    band-pass image with a reference's, over its foreground ``masks`` eroded by ``EROSION``; 0
    where nothing is left after the erosion."""
    own = structure_bands(images)
    if own.shape[1] != bands.shape[1]:
        raise InputError(f"slices of {own.shape[1]} pixels and references of {bands.shape[1]} "
                         "differ")
    inside = np.stack([ndimage.binary_erosion(m, iterations=EROSION) for m in masks])
    inside = inside.reshape(len(own), -1).astype(np.float32)
    squares = bands**2
    out = np.zeros(len(own))
    for i in range(0, len(own), chunk):
        region, band = inside[i:i + chunk], own[i:i + chunk] * inside[i:i + chunk]
        overlap = band @ bands.T
        norms = np.linalg.norm(band, axis=1, keepdims=True) * np.sqrt(region @ squares.T)
        score = np.where(norms > 0, overlap / np.maximum(norms, 1e-12), 0.0)
        out[i:i + chunk] = score.max(1)
    return out


def brain_references(cache: Cache) -> References:
    """The references of ``cache``: its training slices, the threshold from its validation ones."""
    train = cache.split("train", mmap=True)
    val = np.asarray(cache.split("val", mmap=True).image)
    if len(val) < 1:
        raise InputError(f"{cache.path}: the structure test needs validation slices; split "
                         "'val' is empty")
    bands = structure_bands(np.asarray(train.image))
    typical = np.median(best_structure(val, foregrounds(val), bands))
    return References(np.asarray(train.brain).astype(bool), bands,
                      float(STRUCTURE_FRACTION * typical))


def foreground(image: np.ndarray) -> np.ndarray:
    """The slice's object: pixels above Otsu's threshold, holes filled, largest component.

    A constant slice has no threshold and no foreground (an empty mask)."""
    image = np.asarray(image, dtype=np.float64)
    if not np.isfinite(image).all() or np.ptp(image) == 0:
        return np.zeros(image.shape, dtype=bool)
    mask = ndimage.binary_fill_holes(image > threshold_otsu(image))
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def best_dice(masks: np.ndarray, references: np.ndarray, chunk: int = 256) -> np.ndarray:
    """For each mask (N, H, W), its highest Dice against any reference mask (M, H, W)."""
    a = np.asarray(masks, dtype=bool).reshape(len(masks), -1)
    b = np.asarray(references, dtype=bool).reshape(len(references), -1)
    if a.shape[1] != b.shape[1]:
        raise InputError(
            f"masks of shape {masks.shape[1:]} and references of shape "
            f"{references.shape[1:]} differ"
        )
    if len(b) == 0:
        raise InputError("best_dice: expected at least one reference mask, got none")
    bf = b.astype(np.float32)
    b_size = bf.sum(1)
    out = np.empty(len(a))
    for start in range(0, len(a), chunk):
        af = a[start:start + chunk].astype(np.float32)
        overlap = af @ bf.T
        total = af.sum(1)[:, None] + b_size[None, :]
        dice = np.where(total > 0, 2 * overlap / np.maximum(total, 1), 0.0)
        out[start:start + chunk] = dice.max(1)
    return out


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (stays inside [0, 1], sane at 0 and n)."""
    if n < 1:
        raise InputError(f"wilson_interval: expected n >= 1, got {n}")
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _judged(images: np.ndarray, refs: References) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The slices' foregrounds, best outline Dice and best interior structure against ``refs``."""
    masks = foregrounds(images)
    return masks, best_dice(masks, refs.masks), best_structure(images, masks, refs.bands)


def _passes(dice: np.ndarray, structure: np.ndarray, refs: References) -> np.ndarray:
    return (dice >= BRAIN_LIKE_DICE) & (structure >= refs.structure_threshold)


def brain_like(images: np.ndarray, refs: References) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slice: whether it is brain-like, its best outline Dice and its best structure."""
    _, dice, structure = _judged(images, refs)
    return _passes(dice, structure, refs), dice, structure


def foregrounds(images: np.ndarray) -> np.ndarray:
    images = as_slices("images", images)
    return np.stack([foreground(im) for im in images])


def shape_diversity(masks: np.ndarray, seed: int = 0) -> float:
    """Mean over pairs of masks (N, H, W) of 1 - Dice: 0 when every shape is the same.

    Two empty masks count as equal. Beyond ``DIVERSITY_SLICES`` masks, a fixed-seed subset."""
    masks = np.asarray(masks, dtype=bool)
    if len(masks) < 2:
        raise InputError(f"shape_diversity: expected at least 2 masks, got {len(masks)}")
    if len(masks) > DIVERSITY_SLICES:
        pick = np.random.default_rng(seed).choice(len(masks), DIVERSITY_SLICES, replace=False)
        masks = masks[pick]
    flat = masks.reshape(len(masks), -1).astype(np.float32)
    overlap = flat @ flat.T
    size = flat.sum(1)
    total = size[:, None] + size[None, :]
    dice = np.where(total > 0, 2 * overlap / np.maximum(total, 1), 1.0)
    pairs = np.triu_indices(len(masks), 1)
    return float(1.0 - dice[pairs].mean())


def plausibility(
    images: np.ndarray, refs: References, subjects: np.ndarray | None = None, seed: int = 0
) -> dict:
    """The fraction of brain-like slices with a 95% interval, and what each test saw.

    ``subjects`` (one id per slice) marks real slices: the interval is then a subject bootstrap;
    without it the slices are independent draws and the interval is Wilson's."""
    masks, dice, structure = _judged(images, refs)
    ok = _passes(dice, structure, refs)
    n = len(ok)
    if subjects is not None and len(np.unique(subjects)) >= 2:
        ci = mean_ci(ok.astype(float), np.asarray(subjects), CONFIDENCE, seed=seed)
        low, high, method = ci.low, ci.high, ci.method
    else:
        low, high = wilson_interval(int(ok.sum()), n)
        method = "Wilson score interval (independent draws)"
    return {
        "brain_like": {"mean": float(ok.mean()), "ci_low": float(low), "ci_high": float(high),
                       "ci_method": method},
        "n": n,
        "outline_like": float((dice >= BRAIN_LIKE_DICE).mean()),
        "dice_median": float(np.median(dice)),
        "dice_threshold": BRAIN_LIKE_DICE,
        "structure_median": float(np.median(structure)),
        "structure_threshold": refs.structure_threshold,
        "shape_diversity": shape_diversity(masks, seed) if n >= 2 else None,
    }
