"""Align a head to the MNI152 template that ships with nilearn: rigid or affine, with SimpleITK.

The result is one 4 x 4 matrix that maps template world (mm, RAS) to the subject's world (mm,
RAS): a prepared grid defined in template space is sampled from the subject's voxels through it
in one interpolation (pathanat.data.volume.resample), and the same matrix maps any result back.

How: the subject's image times its brain mask and the template's T1 times its brain mask, both
resampled to ``REGISTRATION_MM`` (anti-aliased), are matched by Mattes mutual information (so any
contrast, FLAIR or T2 against the T1 template, works), started from their centres of mass, on a
3-level pyramid; a rigid (Euler) stage first, then for ``affine`` a 12-parameter stage from it.
The metric samples 20% of the voxels with a fixed seed on one thread, so a rerun gives the same
matrix. ITK's physical space is used with the RAS coordinates as they are (it needs only a
consistent frame), so no LPS flip enters.

Library choice, measured (``benchmarks/compare_registration.py``, at 3 mm, one thread each, on
2 shared cores): the MNI T1 turned 10-14 degrees about three axes and shifted 15-22 mm (once also
scaled per axis) was recovered by an affine fit to 0.08 mm mean error over the brain with
SimpleITK in 2.5-2.9 s, and to 0.18-0.19 mm with dipy 1.12 in 7.9-12.5 s; a FLAIR phantom
registered turned and unturned agreed to 0.15 mm (SimpleITK, 8.4 s) and 0.40 mm (dipy, 25.8 s).
Both are accurate far below the 2 mm slice grid. SimpleITK was chosen for its speed at equal
reproducibility: its sampled metric takes a seed, while dipy's random sampling does not, so dipy
was measured sampling every voxel (its reproducible setting), which is what makes it slower.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from pathanat.data.templates import T1_FILE, brain_mask, nilearn_file
from pathanat.data.volume import brain_box, resample

MODES = ("none", "rigid", "affine")
REGISTRATION_MM = 3.0  # coarse enough to be fast, far finer than the errors that matter here
MARGIN_MM = 12.0  # around the brain box, so the edge of the brain has context
MIN_DICE = 0.85  # a registered brain mask overlapping the template's less than this is flagged
# An affine fit needs the whole brain: on a 48 mm phantom slab (a third of the brain in view) it
# found the in-plane scale but shrank z by 0.5-0.76, with Dice in view still 0.94-0.98, while
# rigid stayed within 2.2 mm. Below this fraction of the template's brain in view, it is flagged.
MIN_COVERAGE = 0.9
TEMPLATE_NAME = "MNI152NLin2009aSym"  # nilearn's ICBM 2009a symmetric template


@dataclass(frozen=True)
class Registration:
    """A head aligned to the template, and how well.

    ``matrix`` maps template world (mm) to subject world (mm). ``dice`` is the overlap of the
    subject's brain mask, carried to the template, with the template's brain mask, within the
    subject's field of view; ``ncc`` the normalised cross-correlation of the registered masked
    image with the template T1 over the template's brain in that field of view (high for T1,
    lower or negative for other contrasts: it is reported, not used to flag); ``coverage`` the
    fraction of the template's brain inside that field of view.
    """

    mode: str
    matrix: np.ndarray
    dice: float
    ncc: float
    coverage: float

    def record(self) -> dict:
        return {
            "mode": self.mode,
            "template": TEMPLATE_NAME,
            "template_to_subject": np.round(self.matrix, 6).tolist(),
            "dice": round(self.dice, 4),
            "ncc": round(self.ncc, 4),
            "coverage": round(self.coverage, 4),
        }


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"register must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


@functools.lru_cache(maxsize=1)
def template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1 inside the brain, brain mask, affine) of the template at REGISTRATION_MM."""
    img, brain = _template_1mm()
    t1 = np.asarray(img.dataobj, dtype=np.float32) * brain
    grid, shape = _box_grid(brain, img.affine)
    image = resample(t1, img.affine, grid, shape, order=1)
    mask = resample(brain.astype(np.uint8), img.affine, grid, shape, order=0)
    return image, mask, grid


def brain_centre() -> np.ndarray:
    """World centre (mm) of the template's brain box: where registered grids are centred."""
    img, brain = _template_1mm()
    lo, hi = brain_box(brain, img.affine)
    return (lo + hi) / 2


@functools.lru_cache(maxsize=1)
def _template_1mm() -> tuple[nib.Nifti1Image, np.ndarray]:
    """nilearn's MNI152 2009a T1 and its brain mask (pathanat.data.templates), 1 mm."""
    return nib.load(nilearn_file(T1_FILE)), brain_mask()


def register(image: np.ndarray, affine: np.ndarray, brain: np.ndarray, mode: str) -> Registration:
    """Align ``image`` (voxel -> world ``affine``; ``brain`` its 0/1 brain mask) to the template."""
    import SimpleITK as sitk  # noqa: N813  (imported when used: 0.15 s)

    check_mode(mode)
    if mode == "none":
        raise ValueError("register() needs mode rigid or affine")
    grid, shape = _box_grid(brain, affine)
    moving = resample(image * (brain > 0), affine, grid, shape, order=1)
    fixed, fixed_brain, fixed_grid = template()
    f, m = _to_sitk(fixed, fixed_grid), _to_sitk(moving, grid)

    start = sitk.CenteredTransformInitializer(
        f, m, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    rigid = sitk.Euler3DTransform(_optimise(f, m, start))
    transform: sitk.Transform = rigid
    if mode == "affine":
        start = sitk.AffineTransform(3)
        start.SetCenter(rigid.GetCenter())
        start.SetMatrix(rigid.GetMatrix())
        start.SetTranslation(rigid.GetTranslation())
        transform = sitk.AffineTransform(_optimise(f, m, start))
    matrix = _matrix(transform)
    dice, ncc, coverage = _quality(matrix, image, brain, affine, fixed, fixed_brain, fixed_grid)
    return Registration(mode=mode, matrix=matrix, dice=dice, ncc=ncc, coverage=coverage)


def _optimise(fixed, moving, start):
    import SimpleITK as sitk  # noqa: N813  (imported when used: 0.15 s)

    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(1)  # reproducible sums; prepare runs subjects in parallel instead
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, seed=0)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=200, gradientMagnitudeTolerance=1e-6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(start, inPlace=False)
    result = method.Execute(fixed, moving)
    # Execute wraps the optimised transform in a composite of one.
    return result.GetNthTransform(0) if result.GetName() == "CompositeTransform" else result


def _matrix(transform) -> np.ndarray:
    """ITK's x -> A (x - c) + t + c as a 4 x 4 matrix."""
    a = np.array(transform.GetMatrix()).reshape(3, 3)
    c = np.array(transform.GetCenter())
    out = np.eye(4)
    out[:3, :3] = a
    out[:3, 3] = np.array(transform.GetTranslation()) + c - a @ c
    return out


def _to_sitk(data: np.ndarray, affine: np.ndarray):
    """A SimpleITK image of ``data`` (axes i, j, k) whose physical space is ``affine``'s world."""
    import SimpleITK as sitk  # noqa: N813  (imported when used: 0.15 s)

    img = sitk.GetImageFromArray(np.ascontiguousarray(data.T, dtype=np.float32))  # ITK is k, j, i
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetOrigin(affine[:3, 3].tolist())
    img.SetDirection((affine[:3, :3] / spacing).ravel().tolist())
    return img


def _box_grid(brain: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A REGISTRATION_MM world-axis grid over the brain's box plus MARGIN_MM."""
    lo, hi = brain_box(brain, affine)
    lo, hi = lo - MARGIN_MM, hi + MARGIN_MM
    shape = tuple(int(n) for n in np.ceil((hi - lo) / REGISTRATION_MM))
    grid = np.diag([REGISTRATION_MM] * 3 + [1.0])
    grid[:3, 3] = lo
    return grid, shape


def _quality(
    matrix: np.ndarray,
    image: np.ndarray,
    brain: np.ndarray,
    affine: np.ndarray,
    fixed: np.ndarray,
    fixed_brain: np.ndarray,
    fixed_grid: np.ndarray,
) -> tuple[float, float, float]:
    """Dice of the brain masks and NCC of the images, on the template grid within the subject's
    field of view (a slab covers only part of the template), and the template brain's fraction
    in that view."""
    subject_world = np.linalg.solve(matrix, affine)  # subject voxel -> template world
    shape = fixed.shape
    moved = resample(image * (brain > 0), subject_world, fixed_grid, shape, order=1)
    moved_brain = resample(brain.astype(np.uint8), subject_world, fixed_grid, shape, order=0) > 0
    ones = np.ones(brain.shape, np.uint8)
    in_view = resample(ones, subject_world, fixed_grid, shape, order=0) > 0
    a, b = moved_brain & in_view, (fixed_brain > 0) & in_view
    dice = 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)
    x, y = moved[b].astype(np.float64), fixed[b].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    ncc = float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum())) if b.sum() > 1 else 0.0
    coverage = b.sum() / max((fixed_brain > 0).sum(), 1)
    return float(dice), ncc, float(coverage)
