"""Real anatomical templates shipped inside installed packages, and tissue maps derived from them.

Nothing is downloaded: the MNI ICBM152 2009a symmetric T1, grey- and white-matter maps come with
nilearn (``nilearn/datasets/data``), 1 mm isotropic, 197 x 233 x 189, RAS, skull-stripped, uint8.
From them we derive CSF, the lateral ventricles and both hippocampi; each file used is recorded
with its package, version, path inside the package, licence and sha256.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

NILEARN_DATA = "datasets/data"
T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
GM_FILE = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
WM_FILE = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
# nilearn's own description (datasets/description/icbm152_2009.rst) lists the licence as
# "unknown"; the MNI distributes the ICBM 2009 templates under a permissive copyright notice.
LICENCE = (
    "shipped in nilearn (BSD-3-Clause); ICBM 2009a template: Copyright (C) 1993-2009 Louis "
    "Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University "
    "(use, copying and distribution permitted with this notice; nilearn lists it as unknown)"
)

# Lateral ventricles: the CSF component (CSF > 0.5) through these MNI seeds, one per ventricle body.
VENTRICLE_SEEDS_MM = ((-7.0, -6.0, 20.0), (7.0, -6.0, 20.0))
# Hippocampi: grey matter inside a capsule along each hippocampus's long axis, head to tail, in
# MNI mm (head near the amygdala, tail under the atrium; the symmetric template mirrors them).
HIPPOCAMPUS_AXES_MM = (
    ((-24.0, -13.0, -19.0), (-30.0, -38.0, -2.0)),
    ((24.0, -13.0, -19.0), (30.0, -38.0, -2.0)),
)
HIPPOCAMPUS_RADIUS_MM = 6.0
DERIVATIONS = {
    "brain": f"nilearn.datasets.load_mni152_brain_mask(resolution=1) on {T1_FILE}, holes filled",
    "gm, wm": "the GM and WM maps inside the brain mask, rescaled so that GM + WM <= 1",
    "csf": "brain mask minus GM and WM",
    "ventricles": f"components of CSF > 0.5 through the MNI seeds {VENTRICLE_SEEDS_MM} mm, "
    "dilated by 1 voxel within CSF > 0.1 (lateral ventricles)",
    "hippocampus": f"GM-dominated voxels within {HIPPOCAMPUS_RADIUS_MM} mm of the axes "
    f"{HIPPOCAMPUS_AXES_MM} (MNI mm, head to tail)",
}


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so caches can key on it
class Template:
    """Tissue maps on the template grid (float32 in [0, 1], zero outside the brain) and its affine.

    ``csf`` is what the brain mask holds besides GM and WM; ``ventricles`` and ``hippocampus``
    are 0/1 float32 masks (floats so that they can be warped and thresholded at 0.5).
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    ventricles: np.ndarray
    hippocampus: np.ndarray
    affine: np.ndarray
    sources: tuple[dict, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.gm.shape

    @property
    def brain(self) -> np.ndarray:
        return (self.gm + self.wm + self.csf) > 0.5


def nilearn_file(name: str) -> Path:
    import nilearn

    return Path(nilearn.__file__).parent / NILEARN_DATA / name


def source_record(name: str) -> dict:
    """Where a shipped file comes from, so a cohort can name and check its inputs."""
    path = nilearn_file(name)
    return {
        "package": "nilearn",
        "version": importlib.metadata.version("nilearn"),
        "path": f"nilearn/{NILEARN_DATA}/{name}",
        "licence": LICENCE,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def _unit_volume(name: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(nilearn_file(name))
    return np.asarray(img.dataobj, dtype=np.float32) / 255.0, img.affine


def world_to_voxel(affine: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    points_mm = np.atleast_2d(points_mm)
    return (np.linalg.inv(affine) @ np.c_[points_mm, np.ones(len(points_mm))].T)[:3].T


def brain_mask() -> np.ndarray:
    """nilearn's MNI152 brain mask (T1 > 0.2 of its maximum), holes filled: ventricles inside."""
    from nilearn.datasets import load_mni152_brain_mask

    return ndi.binary_fill_holes(np.asarray(load_mni152_brain_mask(resolution=1).dataobj) > 0)


def lateral_ventricles(csf: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """CSF-dominated components that contain the ventricle-body seeds (not the basal cisterns)."""
    labels, _ = ndi.label(csf > 0.5)
    seeds = np.round(world_to_voxel(affine, np.array(VENTRICLE_SEEDS_MM))).astype(int)
    ids = {int(labels[tuple(s)]) for s in seeds} - {0}
    if not ids:
        raise RuntimeError("ventricle seeds do not fall in template CSF; the template changed")
    return np.isin(labels, sorted(ids))


def hippocampi(gm: np.ndarray, wm: np.ndarray, csf: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """GM-dominated voxels within HIPPOCAMPUS_RADIUS_MM of each hippocampal long axis."""
    inside = np.zeros(gm.shape, bool)
    for head, tail in HIPPOCAMPUS_AXES_MM:
        a, b = np.array(head), np.array(tail)
        # Only the capsule's bounding box is searched (the whole grid would cost seconds).
        ends = world_to_voxel(affine, np.array([a, b]))
        lo = np.maximum(np.floor(ends.min(0) - HIPPOCAMPUS_RADIUS_MM - 1), 0).astype(int)
        hi = np.minimum(np.ceil(ends.max(0) + HIPPOCAMPUS_RADIUS_MM + 2), gm.shape).astype(int)
        grid = np.stack(np.meshgrid(*map(np.arange, lo, hi), indexing="ij"), -1)
        world = grid @ affine[:3, :3].T + affine[:3, 3]
        t = np.clip(((world - a) @ (b - a)) / np.dot(b - a, b - a), 0.0, 1.0)
        dist = np.linalg.norm(world - (a + t[..., None] * (b - a)), axis=-1)
        inside[tuple(map(slice, lo, hi))] |= dist <= HIPPOCAMPUS_RADIUS_MM
    return inside & (gm > 0.5) & (gm > wm) & (gm > csf)


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """The MNI152 2009a template as tissue maps, loaded from nilearn's package data once."""
    gm, affine = _unit_volume(GM_FILE)
    wm, _ = _unit_volume(WM_FILE)
    brain = brain_mask()
    gm, wm = gm * brain, wm * brain
    # Maps can overlap by rounding; renormalise so GM + WM <= 1 and CSF is the rest of the brain.
    total = np.maximum(gm + wm, 1.0)
    gm, wm = gm / total, wm / total
    csf = (brain * (1.0 - gm - wm)).astype(np.float32)
    ventricles = lateral_ventricles(csf, affine)
    # The soft edge of the ventricles (CSF 0..0.5) belongs to them too, so warping keeps their size.
    ventricles = ndi.binary_dilation(ventricles) & (csf > 0.1)
    hippocampus = hippocampi(gm, wm, csf, affine)
    return Template(
        gm=gm.astype(np.float32),
        wm=wm.astype(np.float32),
        csf=csf,
        ventricles=ventricles.astype(np.float32),
        hippocampus=hippocampus.astype(np.float32),
        affine=affine,
        sources=tuple(source_record(f) for f in (T1_FILE, GM_FILE, WM_FILE)),
    )
