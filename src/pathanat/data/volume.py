"""Volume operations: load and check a NIfTI file, find the brain, resample onto the slice grid.

The prepared grid is defined in world (RAS+, mm) coordinates: axes x (left -> right), y
(posterior -> anterior), z (inferior -> superior), spacing (in_plane_mm, in_plane_mm, slice_mm),
centred in-plane on the centre of the brain's bounding box and along z on the centre of the brain's
extent, with exactly (NX, NY, n_slices) voxels. So reorientation, resampling, choosing the central
slices and padding/cropping to the target shape are one interpolation from the source voxels;
nothing is interpolated twice, and any orientation or voxel size (oblique included) is handled by
the affine. Voxels outside the source's field of view are 0 (background).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from scipy import ndimage
from skimage.filters import threshold_otsu

from pathanat.errors import InputError


@dataclass(frozen=True)
class Volume:
    """A 3-D volume in RAS canonical voxel order, with where it came from."""

    data: np.ndarray
    affine: np.ndarray  # voxel -> world (mm) of ``data``
    path: Path
    shape: tuple[int, int, int]  # as stored in the file
    zooms: tuple[float, float, float]  # as stored in the file
    orientation: str  # axis codes as stored in the file, e.g. "LPS"


def load_volume(path: str | Path, what: str = "image") -> Volume:
    """Read a 3-D NIfTI file, check its voxels are finite, and reorient it to RAS canonical."""
    path = Path(path)
    try:
        img = nib.load(path, mmap=False)  # a memory map would break if the file changed
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise InputError(f"{path}: the {what} is a {type(img).__name__}; expected NIfTI")
        data = np.asanyarray(img.dataobj)
    except (ImageFileError, HeaderDataError, OSError, EOFError, ValueError) as err:
        raise InputError(f"{path}: cannot read the {what} as NIfTI ({err})") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: the {what} has shape {data.shape}; expected a 3-D volume")
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(f"{path}: the {what} has voxel type {data.dtype}; expected numbers")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        bad = int(np.size(data) - np.isfinite(data).sum())
        raise InputError(f"{path}: the {what} has {bad} NaN or infinite voxels; expected none")
    # as_closest_canonical only flips and permutes axes, so no voxel value is interpolated here.
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
    return Volume(
        data=np.asarray(canonical.dataobj),
        affine=canonical.affine,
        path=path,
        shape=tuple(int(n) for n in data.shape),
        zooms=tuple(float(z) for z in img.header.get_zooms()[:3]),
        orientation="".join(nib.aff2axcodes(img.affine)),
    )


def check_same_grid(image: Volume, other: Volume, what: str) -> None:
    """Masks must share the image's voxel grid: same stored shape and affine (to 1e-3 mm)."""
    if other.shape != image.shape:
        raise InputError(
            f"{other.path}: the {what} has shape {other.shape}; expected the image's {image.shape}"
        )
    if not np.allclose(other.affine, image.affine, atol=1e-3):
        raise InputError(
            f"{other.path}: the {what}'s affine differs from the image's ({image.path}); "
            "expected the same voxel grid"
        )


def binary(volume: Volume) -> np.ndarray:
    """A mask volume as uint8 0/1 (voxels above 0.5 are in; soft masks are thresholded)."""
    return (volume.data > 0.5).astype(np.uint8)


def labels(volume: Volume) -> np.ndarray:
    """A label volume (dseg) as uint8, checking the labels are whole numbers in 0..255."""
    data = volume.data
    if (data < 0).any() or (data > 255).any() or not np.array_equal(data, np.round(data)):
        raise InputError(f"{volume.path}: expected whole-number labels in 0..255 in the dseg")
    return data.astype(np.uint8)


def estimate_brain_mask(data: np.ndarray) -> np.ndarray:
    """A brain mask from the image alone: Otsu threshold, largest component, holes filled.

    Good for skull-stripped or synthetic images, where the background is dark; for images with a
    skull, supply a ``*_desc-brain_mask`` instead.
    """
    foreground = data > threshold_otsu(data)
    # An opening cuts thin bridges (e.g. to the skull or to noise) before the largest component.
    foreground = ndimage.binary_opening(foreground, iterations=1)
    parts, n = ndimage.label(foreground)
    if n == 0:
        return np.zeros(data.shape, np.uint8)
    largest = np.argmax(np.bincount(parts.ravel())[1:]) + 1
    return ndimage.binary_fill_holes(parts == largest).astype(np.uint8)


def brain_box(brain: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World (min, max) corners of the box around the brain, voxel edges included."""
    if not brain.any():
        raise ValueError("the brain mask is empty")
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(brain.any(axis=other))
        lo.append(idx[0] - 0.5)
        hi.append(idx[-1] + 0.5)
    corners = np.array([[*c, 1.0] for c in product(*zip(lo, hi, strict=True))])
    world = (affine @ corners.T)[:3]
    return world.min(axis=1), world.max(axis=1)


def slice_grid(
    centre: np.ndarray,
    in_plane_mm: float,
    slice_mm: float,
    shape: tuple[int, int],
    n_slices: int,
) -> np.ndarray:
    """The voxel -> world affine of the prepared (NX, NY, n_slices) grid centred on ``centre``."""
    spacing = np.array([in_plane_mm, in_plane_mm, slice_mm])
    size = np.array([*shape, n_slices])
    grid = np.diag([*spacing, 1.0])
    grid[:3, 3] = centre - (size - 1) / 2 * spacing
    return grid


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    grid: np.ndarray,
    grid_shape: tuple[int, int, int],
    order: int,
) -> np.ndarray:
    """``data`` (voxel -> world ``affine``) sampled on the grid; order 1 = linear, 0 = nearest.

    Linear resampling low-pass filters first where the grid is coarser than the source (Gaussian,
    sigma = (factor - 1) / 2 source voxels per axis, as skimage's anti-aliasing), so downsampling
    does not alias; nearest neighbour keeps masks and labels exact.
    """
    to_source = np.linalg.solve(affine, grid)  # grid voxel -> source voxel
    sigma = np.zeros(3)
    if order > 0:
        source_mm = np.linalg.norm(affine[:3, :3], axis=0)
        # After canonical reorientation source axis a runs (near-)along world axis a.
        target_mm = np.abs(np.diag(grid)[:3])
        sigma = np.maximum(0.0, (target_mm / source_mm - 1) / 2)
    # Only the source voxels the grid touches are filtered, with a margin the filter can reach
    # (gaussian_filter truncates at 4 sigma), so filtering the crop equals filtering the whole.
    data, offset = _crop_to(data, to_source, grid_shape, margin=int(np.ceil(4 * sigma.max())) + 2)
    if sigma.any():
        data = ndimage.gaussian_filter(data.astype(np.float32), sigma, mode="nearest")
    return ndimage.affine_transform(
        data,
        to_source[:3, :3],
        offset=to_source[:3, 3] - offset,
        output_shape=grid_shape,
        order=order,
        mode="constant",
        cval=0.0,
        output=np.float32 if order > 0 else data.dtype,
    )


def _crop_to(
    data: np.ndarray, to_source: np.ndarray, grid_shape: tuple[int, int, int], margin: int
) -> tuple[np.ndarray, np.ndarray]:
    """The part of ``data`` the grid touches (plus a margin for filtering), and its start index."""
    corners = np.array([[*c, 1.0] for c in product(*[(0, n - 1) for n in grid_shape])])
    src = (to_source @ corners.T)[:3]
    start = np.clip(np.floor(src.min(axis=1)).astype(int) - margin, 0, data.shape)
    stop = np.clip(np.ceil(src.max(axis=1)).astype(int) + margin + 1, 0, data.shape)
    stop = np.maximum(stop, start + 1)  # keep at least one voxel so the filter has input
    stop = np.minimum(stop, data.shape)
    start = np.minimum(start, stop - 1)
    crop = data[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))]
    return crop, start.astype(float)


STANDARDISE_PERCENTILES = (1.0, 99.0)


def standardisation(
    image: np.ndarray, brain: np.ndarray, percentiles: tuple[float, float] = STANDARDISE_PERCENTILES
) -> tuple[float, float]:
    """Mean and standard deviation of the brain voxels between two percentiles of them.

    Over the brain only (background would dominate otherwise) and without its extremes: a few
    hot voxels, a vessel or bright lesions shift a plain mean and std, and then every subject's
    scale with them. The values are not clipped, so lesions keep their contrast; the mapping
    stays ``(x - mean) / std``, exactly invertible. ``percentiles=(0, 100)`` is the plain z-score.
    """
    values = image[brain > 0].astype(np.float64)
    if values.size < 2:
        raise ValueError("fewer than 2 brain voxels in the kept slices")
    lo, hi = np.percentile(values, percentiles)
    kept = values[(values >= lo) & (values <= hi)]
    std = float(kept.std())
    if std <= 0:
        raise ValueError("the image is constant over the brain")
    return float(kept.mean()), std


SKULL_GAP = 0.10  # measured: brains 0.004-0.025, heads whose mask took the scalp 0.15-0.55
SHELL_MM = 15.0


def skull_suspected(brain: np.ndarray, zooms: Sequence[float]) -> str | None:
    """Why an estimated brain mask looks like it holds the scalp (and so the skull), or None.

    A mask that took the scalp is a shell around the brain with the dark bone and CSF between
    them left out: filling each axial slice's holes adds much to its outer SHELL_MM. That added
    fraction was 0.004-0.025 for masks estimated on skull-stripped heads (MNI152 T1 at 1 and
    3 mm, phantom FLAIR and T1, whole and as 48 mm slabs) and 0.15 (3 mm) to 0.55 (1 mm) for the
    same heads given a 3 mm CSF layer, 6 mm of bone and 6 mm of scalp joined to the brain by
    bright bridges (as the optic nerves and the neck join them).
    """
    mask = brain > 0
    if not mask.any():
        return None
    filled = np.stack([ndimage.binary_fill_holes(mask[:, :, k]) for k in range(mask.shape[2])], 2)
    shell = filled & (ndimage.distance_transform_edt(filled, sampling=zooms) <= SHELL_MM)
    gap = (shell & ~mask).sum() / shell.sum()
    if gap > SKULL_GAP:
        return (f"it encloses a ring it leaves out ({gap:.0%} of its outer {SHELL_MM:g} mm), "
                "as a scalp does around the skull")
    return None
