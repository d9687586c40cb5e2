"""The phantom cohort: synthetic MS (FLAIR + lesions) or AD (T1 + atrophy) subjects made from the
real MNI152 template that ships with nilearn, with every generating factor known.

A subject is the template under a smooth random diffeomorphism and a global scale, with its
ventricles grown or shrunk, its cortex thinned and (AD) its hippocampi shrunk, rendered with
tissue intensities drawn per subject, a smooth bias field and Rician noise; MS subjects get
hyperintense white-matter lesions placed preferentially around the ventricles.

All randomness of subject i comes from ``SeedSequence([cohort_seed, i])``, so a subject does not
depend on the cohort size, and its factors (``draw_factors``) determine its volumes completely
(``render_subject``): the participants table is the whole truth.
"""

from __future__ import annotations

import functools
import gzip
import math
import multiprocessing as mp
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy import sparse

import pathanat
from pathanat.atomic import atomic_dir
from pathanat.data.templates import DERIVATIONS, Template, load_template
from pathanat.defaults import SEED, SLAB_MM, WORKERS
from pathanat.errors import PathanatError, checked_int
from pathanat.jsonfiles import write_json

GENERATOR_VERSION = "1.0"
KINDS = ("ms", "ad")
MODALITY = {"ms": "FLAIR", "ad": "T1w"}
LABELS = ("background", "csf", "ventricles", "gm", "wm", "hippocampus")
BACKGROUND, CSF, VENTRICLES, GM, WM, HIPPOCAMPUS = range(6)

# Ranges of the per-subject factors, drawn uniformly; every one is written to participants.tsv.
ANATOMY_RANGES = {
    "warp_mm": (1.5, 3.0),  # std of the warp's velocity at its control points
    "scale": (0.92, 1.08),  # global (isotropic) scale about the brain's centre
    "ventricle_mm": (-1.0, 1.5),  # displacement of the ventricle wall; > 0 grows them
    "cortex_thinning_mm": (0.0, 0.8),  # GM removed from the pial side, turned into CSF
}
CONTRAST_RANGES = {
    "ms": {"gm_ratio": (1.15, 1.35), "csf_ratio": (0.08, 0.2)},  # FLAIR: GM > WM >> CSF
    "ad": {"gm_ratio": (0.55, 0.7), "csf_ratio": (0.15, 0.3)},  # T1: WM > GM > CSF
}
SCANNER_RANGES = {
    "wm_intensity": (600.0, 1400.0),  # scanner units; images are rounded like integer data
    "bias_strength": (0.05, 0.2),  # std of the log bias field at its control points
    "noise_fraction": (0.015, 0.04),  # Rician sigma / WM intensity
}
LESION_RANGES = {
    "lesion_rate": (0.0, 25.0),  # Poisson mean of the number of lesions centred in the volume
    "lesion_mean_diameter_mm": (4.0, 9.0),
}
WARP_SPACING_MM = 20.0  # control-point spacing of the random velocity field
WARP_GRID_MM = 3  # the velocity is integrated on this grid, then interpolated to 1 mm
SQUARINGS = 5  # scaling and squaring: exp(v) = (exp(v / 2^5))^(2^5)
VENTRICLE_SMOOTH_MM = 3.0  # the ventricle and hippocampus velocities are gradients of their
HIPPOCAMPUS_SMOOTH_MM = 2.5  # smoothed masks, normalised to a peak of 1 mm
BIAS_SPACING_MM = 65.0
AD_VENTRICLE_MM = 3.0  # at severity 1: extra ventricle wall displacement,
AD_CORTEX_MM = 1.2  # extra cortical thinning,
AD_HIPPOCAMPUS_MM = 1.5  # and inward displacement of the hippocampal surface
LESION_MIN_DIAMETER_MM = 3.0
LESION_MAX_DIAMETER_MM = 20.0
LESION_ELONGATION = (1.0, 1.8)  # the two longer axes relative to the shortest
LESION_CONTRAST = (1.3, 1.8)  # lesion intensity / WM intensity
LESION_EDGE_MM = 1.0  # width of the soft (partial-volume) edge
PERIVENTRICULAR_MM = 6.0  # lesion centre density ~ exp(-distance to ventricles / this) + floor
DEEP_WM_WEIGHT = 0.02
Z_PAD = 4  # slices generated beyond the slab so that distances are right at its edges
REGION_MARGIN_MM = 18  # the warp grid reaches this far beyond the generated slices


@dataclass
class PhantomSubject:
    """A synthetic subject on a 1 mm grid; volumes share ``affine``; ``lesion_mask`` None for AD."""

    image: np.ndarray
    lesion_mask: np.ndarray | None
    brain_mask: np.ndarray
    dseg: np.ndarray
    factors: dict
    affine: np.ndarray


def subject_rng(cohort_seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cohort_seed, index]))


def draw_factors(kind: str, index: int, cohort_seed: int) -> dict:
    """Every random factor of subject ``index``: anatomy, contrast, scanner and pathology.

    Anatomy is drawn first from the same stream for both kinds, so subject i of an MS and of an
    AD cohort with the same seed share their anatomy.
    """
    rng = subject_rng(cohort_seed, index)
    factors: dict = {"warp_seed": int(rng.integers(2**31))}
    factors |= {k: float(rng.uniform(*r)) for k, r in ANATOMY_RANGES.items()}
    factors |= {k: float(rng.uniform(*r)) for k, r in CONTRAST_RANGES[kind].items()}
    factors |= {k: float(rng.uniform(*r)) for k, r in SCANNER_RANGES.items()}
    factors |= {"bias_seed": int(rng.integers(2**31)), "noise_seed": int(rng.integers(2**31))}
    if kind == "ms":
        factors |= {k: float(rng.uniform(*r)) for k, r in LESION_RANGES.items()}
        factors["lesion_seed"] = int(rng.integers(2**31))
    else:
        factors["atrophy_severity"] = float(rng.uniform(0.0, 1.0))
    return factors


# ---------------------------------------------------------------------------------------------
# Geometry


def slab_range(template: Template, slab_mm: float | None) -> tuple[int, int]:
    """First and past-last template slice of the axial slab centred on the brain's axial extent."""
    nz = template.shape[2]
    if slab_mm is None:
        return 0, nz
    n = round(slab_mm)
    zs = np.flatnonzero(template.brain.any(axis=(0, 1)))
    k0 = round((zs[0] + zs[-1] + 1 - n) / 2)
    k0 = min(max(k0, 0), nz - n)
    return k0, k0 + n


def slab_affine(affine: np.ndarray, k0: int) -> np.ndarray:
    """The template affine for a grid that starts at template slice k0 (same world z per slice)."""
    shift = np.eye(4)
    shift[2, 3] = k0
    return affine @ shift


def bspline_weights(positions: np.ndarray, n_ctrl: int, length: float) -> np.ndarray:
    """(len(positions), n_ctrl) cubic B-spline weights; knots spread so [0, length] is covered."""
    h = length / (n_ctrl - 3)
    t = np.abs(positions[:, None] - (np.arange(n_ctrl) - 1) * h) / h
    return np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def linear_weights(positions: np.ndarray, n: int) -> sparse.csr_matrix:
    """(len(positions), n) linear-interpolation weights on 0..n-1, clamped at both ends."""
    p = np.clip(positions, 0, n - 1)
    i0 = np.minimum(np.floor(p).astype(int), n - 2)
    w = p - i0
    rows = np.repeat(np.arange(len(p)), 2)
    cols = np.c_[i0, i0 + 1].ravel()
    return sparse.csr_matrix((np.c_[1 - w, w].ravel(), (rows, cols)), shape=(len(p), n))


def separable(volume: np.ndarray, weights: list) -> np.ndarray:
    """Apply one (n_out, n_in) weight matrix along each leading axis of ``volume`` in turn:
    resampling a volume onto any tensor grid costs a few products instead of a 3-D interpolation."""
    for axis, w in enumerate(weights):
        moved = np.moveaxis(volume, axis, 0)
        out = w @ moved.reshape(moved.shape[0], -1)
        volume = np.moveaxis(np.asarray(out).reshape(w.shape[0], *moved.shape[1:]), 0, axis)
    return volume


def spline_field(coeffs: np.ndarray, axes: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """A tensor-product B-spline with control ``coeffs`` (cx, cy, cz, ...) over a volume of
    ``shape`` voxels, evaluated on the grid of the 1-D voxel positions ``axes``."""
    weights = [
        bspline_weights(pos.astype(np.float64), coeffs.shape[axis], n - 1)
        for axis, (pos, n) in enumerate(zip(axes, shape, strict=True))
    ]
    return separable(coeffs, weights)


def n_controls(shape: tuple[int, ...], spacing_mm: float) -> tuple[int, ...]:
    return tuple(math.ceil((n - 1) / spacing_mm) + 3 for n in shape)


def _smoothed_gradient(mask: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Gradient of the smoothed mask on the warp grid, (..., 3), its largest norm scaled to 1."""
    grad = np.stack(np.gradient(ndi.gaussian_filter(mask, sigma_mm)), -1)
    grad = grad[::WARP_GRID_MM, ::WARP_GRID_MM, ::WARP_GRID_MM]
    return (grad / np.linalg.norm(grad, axis=-1).max()).astype(np.float32)


@functools.lru_cache(maxsize=2)
def structure_fields(template: Template) -> tuple[np.ndarray, np.ndarray]:
    """Unit velocity fields pointing into the ventricles and into the hippocampi (warp grid)."""
    return (
        _smoothed_gradient(template.ventricles, VENTRICLE_SMOOTH_MM),
        _smoothed_gradient(template.hippocampus, HIPPOCAMPUS_SMOOTH_MM),
    )


@functools.lru_cache(maxsize=2)
def brain_centre(template: Template) -> np.ndarray:
    return np.array(ndi.center_of_mass(template.brain))


def exponentiate(velocity: np.ndarray, steps: int = SQUARINGS) -> np.ndarray:
    """Displacement (mm) of the flow of a stationary velocity (mm, on the warp grid) at time 1,
    by scaling and squaring; each small step is invertible, so the result is a diffeomorphism."""
    disp = velocity.astype(np.float64) / 2**steps
    grid = np.indices(velocity.shape[:3], dtype=np.float64)
    for _ in range(steps):
        coords = grid + np.moveaxis(disp, -1, 0) / WARP_GRID_MM
        disp = disp + np.stack(
            [ndi.map_coordinates(disp[..., d], coords, order=1, mode="nearest") for d in range(3)],
            -1,
        )
    return disp


def velocity_field(factors: dict, template: Template, z_range: tuple[int, int]) -> np.ndarray:
    """The subject's stationary velocity (mm) on the warp grid over template slices ``z_range``
    (from a multiple of WARP_GRID_MM): a random smooth part, ventricle growth, hippocampal loss."""
    shape = template.shape
    rng = np.random.default_rng(factors["warp_seed"])
    coeffs = rng.standard_normal((*n_controls(shape, WARP_SPACING_MM), 3)) * factors["warp_mm"]
    axes = [
        np.arange(0, shape[0], WARP_GRID_MM),
        np.arange(0, shape[1], WARP_GRID_MM),
        np.arange(z_range[0], z_range[1], WARP_GRID_MM),
    ]
    v = spline_field(coeffs, axes, shape)
    toward_ventricles, toward_hippocampi = structure_fields(template)
    zs = slice(z_range[0] // WARP_GRID_MM, z_range[0] // WARP_GRID_MM + len(axes[2]))
    severity = factors.get("atrophy_severity", 0.0)
    # Pulling from inside a structure grows it (we sample the template at x + u(x)).
    v += (factors["ventricle_mm"] + AD_VENTRICLE_MM * severity) * toward_ventricles[:, :, zs]
    v -= AD_HIPPOCAMPUS_MM * severity * toward_hippocampi[:, :, zs]
    return v


def sampling_coordinates(
    factors: dict, template: Template, z_range: tuple[int, int]
) -> np.ndarray:
    """Template voxel coordinates (3, nx, ny, nz) sampled by each output voxel of slices z_range:
    first the global scale about the brain centre, then the integrated warp."""
    nz_total = template.shape[2]
    lo = max(z_range[0] - REGION_MARGIN_MM, 0) // WARP_GRID_MM * WARP_GRID_MM
    hi = min(z_range[1] + REGION_MARGIN_MM, nz_total)
    disp = exponentiate(velocity_field(factors, template, (lo, hi)))
    centre = brain_centre(template)
    axes = [np.arange(template.shape[0]), np.arange(template.shape[1]), np.arange(*z_range)]
    scaled = [c + (a - c) / factors["scale"] for a, c in zip(axes, centre, strict=True)]
    weights = [
        linear_weights((pos - origin) / WARP_GRID_MM, n)
        for pos, origin, n in zip(scaled, (0, 0, lo), disp.shape[:3], strict=True)
    ]
    coords = np.moveaxis(separable(disp, weights), -1, 0)
    return coords + np.stack(np.meshgrid(*scaled, indexing="ij"))


# ---------------------------------------------------------------------------------------------
# Tissue, pathology and contrast


@functools.lru_cache(maxsize=2)
def brain_corners(template: Template) -> tuple[np.ndarray, np.ndarray]:
    box = bounding_box(template.brain, margin=1)
    return np.array([b.start for b in box]), np.array([b.stop - 1 for b in box])


def warped_tissue(template: Template, coords: np.ndarray) -> dict[str, np.ndarray]:
    """Tissue fractions (linear interpolation) and structure masks (nearest) at ``coords``."""
    # Only points that land in the template brain's box can be non-zero: 40% fewer to sample.
    lo, hi = brain_corners(template)
    inside = np.ones(coords.shape[1:], bool)
    for d in range(3):
        inside &= (coords[d] >= lo[d]) & (coords[d] <= hi[d])
    points = coords[:, inside]

    def sample(volume: np.ndarray, order: int) -> np.ndarray:
        out = np.zeros(coords.shape[1:], np.float32)
        out[inside] = ndi.map_coordinates(volume, points, order=order, mode="constant")
        return out

    fractions = {name: sample(getattr(template, name), 1) for name in ("gm", "wm", "csf")}
    masks = {name: sample(getattr(template, name), 0) for name in ("ventricles", "hippocampus")}
    return fractions | masks


def tissue_labels(t: dict[str, np.ndarray]) -> np.ndarray:
    """The dseg labels: the most probable tissue in the brain, ventricles and hippocampi apart."""
    brain = t["gm"] + t["wm"] + t["csf"] > 0.5
    tissue = np.argmax(np.stack([t["csf"], t["gm"], t["wm"]]), axis=0)
    labels = np.choose(tissue, [CSF, GM, WM]).astype(np.uint8)
    labels[(labels == CSF) & (t["ventricles"] > 0.5)] = VENTRICLES
    labels[(labels == GM) & (t["hippocampus"] > 0.5)] = HIPPOCAMPUS
    labels[~brain] = BACKGROUND
    return labels


def thin_cortex(t: dict[str, np.ndarray], thinning_mm: float) -> None:
    """Turn GM within ``thinning_mm`` of the pial side (background or sulcal CSF) into CSF, in
    place: the cortex thins and the sulci widen. Partial voxels keep a partial fraction."""
    labels = tissue_labels(t)
    box = bounding_box(labels > 0, margin=2)
    pial = (labels[box] == BACKGROUND) | (labels[box] == CSF)
    depth = ndi.distance_transform_edt(~pial).astype(np.float32)
    # GM voxels within depth t of the pial side lose all of their GM, the next ones a fraction;
    # the partial GM of the pial voxels themselves (depth 0) is left alone, so t = 0 is identity.
    keep = np.where(depth > 0, np.clip(depth - thinning_mm, 0.0, 1.0), 1.0)
    removed = t["gm"][box] * (1.0 - keep) * (t["hippocampus"][box] < 0.5)
    t["gm"][box] -= removed
    t["csf"][box] += removed


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the smallest box around ``mask`` grown by ``margin`` (distance maps are costly)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo, hi = (hits[0], hits[-1] + 1) if hits.size else (0, 0)
        box.append(slice(max(lo - margin, 0), min(hi + margin, mask.shape[axis])))
    return tuple(box)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def lesion_map(
    factors: dict, labels: np.ndarray, centre_slices: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Soft lesion occupancy (0..1, 0.5 at the lesion surface), per-voxel contrast gain, the
    number (1..n) of the lesion that dominates each voxel (0: none), and n, the number drawn.
    Centres fall in WM only (slices ``centre_slices``), most often next to the ventricles; the
    caller clips the lesions to WM."""
    rng = np.random.default_rng(factors["lesion_seed"])
    n = int(rng.poisson(factors["lesion_rate"]))
    density = np.zeros(labels.shape)
    box = bounding_box(labels == WM, margin=0)
    to_ventricles = ndi.distance_transform_edt(labels[box] != VENTRICLES)
    periventricular = np.exp(-to_ventricles / PERIVENTRICULAR_MM)
    density[box] = (labels[box] == WM) * (periventricular + DEEP_WM_WEIGHT)
    density[:, :, : centre_slices[0]] = 0.0
    density[:, :, centre_slices[1] :] = 0.0
    occupancy = np.zeros(labels.shape, np.float32)
    gain = np.zeros(labels.shape, np.float32)
    owner = np.zeros(labels.shape, np.int32)
    if n == 0 or density.sum() == 0:
        return occupancy, gain, owner, 0
    cdf = np.cumsum(density.ravel(), dtype=np.float64)
    flat = np.searchsorted(cdf, rng.uniform(0, cdf[-1], n), side="right")
    mean_extra = factors["lesion_mean_diameter_mm"] - LESION_MIN_DIAMETER_MM
    for number, idx in enumerate(flat, start=1):
        centre = np.array(np.unravel_index(idx, labels.shape)) + rng.uniform(-0.5, 0.5, 3)
        diameter = min(LESION_MIN_DIAMETER_MM + rng.exponential(mean_extra), LESION_MAX_DIAMETER_MM)
        semi = diameter / 2 * np.r_[1.0, rng.uniform(*LESION_ELONGATION, 2)]
        rotation = random_rotation(rng)
        contrast = rng.uniform(*LESION_CONTRAST) - 1.0
        reach = int(np.ceil(semi.max() + LESION_EDGE_MM))
        lo = np.maximum(np.floor(centre).astype(int) - reach, 0)
        hi = np.minimum(np.floor(centre).astype(int) + reach + 2, labels.shape)
        box = tuple(map(slice, lo, hi))
        local = np.stack(np.meshgrid(*map(np.arange, lo, hi), indexing="ij"), -1) - centre
        radius = np.linalg.norm((local @ rotation) / semi, axis=-1)
        # 0.5 on the ellipsoid surface, ramping over LESION_EDGE_MM along the shortest axis.
        soft = np.clip(0.5 + (1.0 - radius) * semi[0] / LESION_EDGE_MM, 0.0, 1.0)
        owner[box] = np.where(soft > occupancy[box], number, owner[box])
        occupancy[box] = np.maximum(occupancy[box], soft)
        gain[box] = np.maximum(gain[box], soft * contrast)
    return occupancy, gain, owner, n


def bias_field(factors: dict, shape: tuple[int, ...], z_range: tuple[int, int]) -> np.ndarray:
    """Smooth multiplicative field exp(b), b a coarse B-spline over the whole template."""
    rng = np.random.default_rng(factors["bias_seed"])
    coeffs = rng.standard_normal(n_controls(shape, BIAS_SPACING_MM)) * factors["bias_strength"]
    axes = [np.arange(shape[0]), np.arange(shape[1]), np.arange(*z_range)]
    return np.exp(spline_field(coeffs, axes, shape))


def rician(signal: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """|signal + n1 + i n2| with n1, n2 ~ N(0, sigma): the magnitude of complex Gaussian noise."""
    rng = np.random.default_rng(seed)
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.hypot(real, imag)


def region_volumes(labels: np.ndarray) -> dict[str, float]:
    """Volumes (mm3 at 1 mm voxels) of each label and of the whole brain."""
    counts = np.bincount(labels.ravel(), minlength=len(LABELS))
    volumes = {f"{name}_mm3": float(counts[i]) for i, name in enumerate(LABELS) if i}
    volumes["brain_mm3"] = float(counts[1:].sum())
    return volumes


def render_subject(
    kind: str, factors: dict, slab_mm: float | None = SLAB_MM, template: Template | None = None
) -> PhantomSubject:
    """Build a subject's volumes from its factors alone (deterministic)."""
    check_kind(kind)
    template = template or load_template()
    k0, k1 = slab_range(template, slab_mm)
    g0, g1 = max(k0 - Z_PAD, 0), min(k1 + Z_PAD, template.shape[2])
    tissue = warped_tissue(template, sampling_coordinates(factors, template, (g0, g1)))
    severity = factors.get("atrophy_severity", 0.0)
    thin_cortex(tissue, factors["cortex_thinning_mm"] + AD_CORTEX_MM * severity)
    labels = tissue_labels(tissue)

    wm_signal = tissue["wm"]
    lesions = None
    measured: dict = {}
    if kind == "ms":
        occupancy, gain, owner, measured["lesions_drawn"] = lesion_map(
            factors, labels, (k0 - g0, k1 - g0)
        )
        # Lesions are clipped to WM: the mask never leaves it, and only the WM fraction brightens.
        lesions = (occupancy >= 0.5) & (labels == WM)
        owner = owner[:, :, k0 - g0 : k1 - g0]
        wm_signal = wm_signal * (1.0 + gain * (labels == WM))
    signal = factors["wm_intensity"] * (
        wm_signal + factors["gm_ratio"] * tissue["gm"] + factors["csf_ratio"] * tissue["csf"]
    )
    signal *= bias_field(factors, template.shape, (g0, g1))
    sigma = factors["noise_fraction"] * factors["wm_intensity"]
    image = np.round(rician(signal, sigma, factors["noise_seed"]))

    keep = (slice(None), slice(None), slice(k0 - g0, k1 - g0))
    labels = labels[keep]
    if lesions is not None:
        lesions = lesions[keep]
        measured["lesion_count"] = len(np.unique(owner[lesions]))
        measured["lesion_volume_mm3"] = float(lesions.sum())
        lesions = lesions.astype(np.uint8)
    measured |= region_volumes(labels)
    return PhantomSubject(
        image=image[keep].astype(np.float32),
        lesion_mask=lesions,
        brain_mask=(labels > 0).astype(np.uint8),
        dseg=labels,
        factors=factors | measured,
        affine=slab_affine(template.affine, k0),
    )


def make_subject(
    kind: str, index: int, cohort_seed: int, slab_mm: float | None = SLAB_MM
) -> PhantomSubject:
    """Subject ``index`` of the cohort with seed ``cohort_seed`` (whatever the cohort's size)."""
    return render_subject(kind, draw_factors(kind, index, cohort_seed), slab_mm)


# ---------------------------------------------------------------------------------------------
# The cohort on disk


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise PathanatError(f"phantom kind must be one of {', '.join(KINDS)}; got {kind!r}")


def check_arguments(kind: str, n_subjects: int, seed: int, slab_mm: float | None) -> None:
    check_kind(kind)
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, int) or n_subjects < 1:
        raise PathanatError(f"number of subjects must be an integer >= 1; got {n_subjects!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PathanatError(f"seed must be an integer >= 0; got {seed!r}")
    depth = load_template().shape[2]
    if slab_mm is not None and not (isinstance(slab_mm, int | float) and 8 <= slab_mm <= depth):
        raise PathanatError(
            f"slab thickness must be between 8 and {depth} mm (or None for whole volumes); "
            f"got {slab_mm!r}"
        )


def subject_id(index: int, n_subjects: int) -> str:
    return f"sub-{index:0{max(4, len(str(n_subjects - 1)))}d}"


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """A .nii.gz with a zero gzip mtime and no file name in it, so equal data gives equal bytes."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def write_subject(folder: Path, sid: str, kind: str, subject: PhantomSubject) -> None:
    anat = folder / sid / "anat"
    anat.mkdir(parents=True)
    write_nifti(anat / f"{sid}_{MODALITY[kind]}.nii.gz", subject.image, subject.affine)
    if subject.lesion_mask is not None:
        write_nifti(anat / f"{sid}_label-lesion_mask.nii.gz", subject.lesion_mask, subject.affine)
    write_nifti(anat / f"{sid}_desc-brain_mask.nii.gz", subject.brain_mask, subject.affine)
    write_nifti(anat / f"{sid}_dseg.nii.gz", subject.dseg, subject.affine)


COLUMN_DOCS = {
    "participant_id": ("subject identifier", None),
    "warp_seed": ("seed of the random smooth velocity field (anatomy)", None),
    "warp_mm": ("std of the warp velocity at its 20 mm control points (anatomy)", "mm"),
    "scale": ("global isotropic scale about the brain centre (anatomy)", None),
    "ventricle_mm": ("anatomical ventricle-wall displacement; > 0 larger ventricles", "mm"),
    "cortex_thinning_mm": ("anatomical cortical thinning from the pial side", "mm"),
    "gm_ratio": ("GM intensity / WM intensity", None),
    "csf_ratio": ("CSF intensity / WM intensity", None),
    "wm_intensity": ("WM intensity before bias and noise", "arbitrary scanner units"),
    "bias_strength": ("std of the log bias field at its control points", None),
    "bias_seed": ("seed of the bias field", None),
    "noise_fraction": ("Rician noise sigma / WM intensity", None),
    "noise_seed": ("seed of the Rician noise", None),
    "lesion_rate": ("Poisson mean of the number of lesions drawn (pathology)", None),
    "lesion_mean_diameter_mm": ("mean drawn lesion diameter (shortest axis >= 3 mm)", "mm"),
    "lesion_seed": ("seed of lesion count, placement, shape and contrast (pathology)", None),
    "atrophy_severity": ("AD atrophy severity in [0, 1] (pathology)", None),
    "lesions_drawn": ("lesions drawn (Poisson), centred in the written volume", None),
    "lesion_count": ("lesions with at least one voxel in the lesion mask (measured)", None),
    "lesion_volume_mm3": ("lesion-mask volume in the written volume (measured)", "mm3"),
    "brain_mm3": ("brain-mask volume: tissue and CSF (measured)", "mm3"),
    **{
        f"{name}_mm3": (f"volume labelled {name} in the dseg (measured)", "mm3")
        for name in LABELS[1:]
    },
}


def participants_sidecar(columns: list[str], scope: str) -> dict:
    sidecar = {}
    for column in columns:
        description, unit = COLUMN_DOCS[column]
        if column.endswith("_mm3"):
            description += f"; over the {scope}"
        sidecar[column] = {"Description": description} | ({"Units": unit} if unit else {})
    return sidecar


def generator_parameters() -> dict:
    """Every constant of the generator, for the cohort's phantom.json."""
    return {
        "anatomy_ranges": ANATOMY_RANGES,
        "contrast_ranges": CONTRAST_RANGES,
        "scanner_ranges": SCANNER_RANGES,
        "lesion_ranges": LESION_RANGES,
        "warp_spacing_mm": WARP_SPACING_MM,
        "warp_grid_mm": WARP_GRID_MM,
        "squarings": SQUARINGS,
        "ventricle_smooth_mm": VENTRICLE_SMOOTH_MM,
        "hippocampus_smooth_mm": HIPPOCAMPUS_SMOOTH_MM,
        "bias_spacing_mm": BIAS_SPACING_MM,
        "ad_ventricle_mm": AD_VENTRICLE_MM,
        "ad_cortex_mm": AD_CORTEX_MM,
        "ad_hippocampus_mm": AD_HIPPOCAMPUS_MM,
        "lesion_min_diameter_mm": LESION_MIN_DIAMETER_MM,
        "lesion_max_diameter_mm": LESION_MAX_DIAMETER_MM,
        "lesion_elongation": LESION_ELONGATION,
        "lesion_contrast": LESION_CONTRAST,
        "lesion_edge_mm": LESION_EDGE_MM,
        "periventricular_mm": PERIVENTRICULAR_MM,
        "deep_wm_weight": DEEP_WM_WEIGHT,
        "z_pad": Z_PAD,
        "region_margin_mm": REGION_MARGIN_MM,
    }


def write_metadata(
    folder: Path, kind: str, seed: int, slab_mm: float | None, rows: list[dict], template: Template
) -> None:
    """participants.tsv/.json, dataset_description.json, dseg.tsv and phantom.json."""
    k0, k1 = slab_range(template, slab_mm)
    scope = "whole volume" if slab_mm is None else f"{k1 - k0} mm axial slab"
    table = pd.DataFrame(rows)
    table.to_csv(folder / "participants.tsv", sep="\t", index=False, lineterminator="\n")
    write_json(folder / "participants.json", participants_sidecar(list(table.columns), scope))
    write_json(folder / "dataset_description.json", {
        "Name": f"pathanat phantom {kind.upper()} cohort",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "GeneratedBy": [{
            "Name": "pathanat phantom",
            "Version": pathanat.__version__,
            "Description": "synthetic subjects from the MNI152 2009a template shipped with nilearn",
        }],
    })
    (folder / "dseg.tsv").write_text(
        "index\tname\n" + "".join(f"{i}\t{name}\n" for i, name in enumerate(LABELS))
    )
    write_json(folder / "phantom.json", {
        "generator_version": GENERATOR_VERSION,
        "pathanat_version": pathanat.__version__,
        "kind": kind,
        "modality": MODALITY[kind],
        "seed": seed,
        "n_subjects": len(rows),
        "slab_mm": slab_mm,
        "template_slices": [k0, k1],
        "world_z_mm": [float(slab_affine(template.affine, k)[2, 3]) for k in (k0, k1 - 1)],
        "volume_scope": scope,
        "parameters": generator_parameters(),
        "sources": list(template.sources),
        "derivations": DERIVATIONS,
    })


def generate_cohort(
    kind: str,
    n_subjects: int,
    out_dir: Path,
    seed: int = SEED,
    slab_mm: float | None = SLAB_MM,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = WORKERS,
) -> Path:
    """Write a phantom cohort (BIDS-like, see contract) to ``out_dir`` and return its path.

    Subjects are rendered in ``workers`` processes (each subject is drawn from its own seed, so
    the cohort is the same for any number). Example:
    ``generate_cohort("ms", 100, Path("cohorts/ms"), seed=0)``.
    """
    from tqdm import tqdm

    check_arguments(kind, n_subjects, seed, slab_mm)
    checked_int(workers, "workers")
    out_dir = Path(out_dir)
    template = load_template()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        jobs = [(kind, i, n_subjects, seed, slab_mm, tmp) for i in range(n_subjects)]
        rows = list(tqdm(_written_subjects(jobs, workers), total=n_subjects,
                         disable=not progress, desc="phantom", unit="subject"))
        write_metadata(tmp, kind, seed, slab_mm, rows, template)
    return out_dir


def _written_subject(
    kind: str, index: int, n_subjects: int, seed: int, slab_mm: float | None, folder: Path
) -> dict:
    """Render subject ``index`` into ``folder``; its participants.tsv row."""
    sid = subject_id(index, n_subjects)
    subject = render_subject(kind, draw_factors(kind, index, seed), slab_mm, load_template())
    write_subject(folder, sid, kind, subject)
    return {"participant_id": sid, **subject.factors}


def _written_subjects(jobs: list[tuple], workers: int) -> Iterator[dict]:
    """The rows of ``_written_subject`` for every job, in order, from ``workers`` processes."""
    if workers == 1 or len(jobs) == 1:
        yield from (_written_subject(*job) for job in jobs)
        return
    # Not fork: the caller may hold threads (torch, a progress bar) whose locks a fork would copy.
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context(method)) as pool:
        yield from pool.map(_written_subject, *zip(*jobs, strict=True))
