"""Compare SimpleITK and dipy for the affine/rigid registration of `prepare --register`.

Known truth: nilearn's MNI152 T1 (skull-stripped) carried into a 1.5 mm "scanner" grid by a
known transform (turned 10-14 degrees about three axes and shifted 15-22 mm, and once also
scaled 0.97-1.05 per axis), with 10% multiplicative noise; each library registers it back to
the template at --mm resolution with mutual information from the centres of mass, a rigid then
an affine stage on a 4-2-1 pyramid. The error is the distance between the found and the true
transform over the template's brain voxels. For another contrast, a full FLAIR phantom is
registered turned and unturned, and the two results must differ by the known turn. Each library
runs on one thread (SimpleITK: SetGlobalDefaultNumberOfThreads(1); dipy is single-threaded)
and samples deterministically (SimpleITK: 20% of voxels, fixed seed; dipy: every voxel, as its
random sampling takes no seed).

Measured at 3 mm on the 2 shared cores (other jobs ran, so times vary by 2-3x from run to run;
a later run under heavier load gave the same errors with SimpleITK 4-7 s and dipy 24-50 s):

    case                                   SimpleITK              dipy 1.12
    T1 turned, rigid                       0.04 mm mean, 1.3 s    0.01 mm,  6.4 s
    T1 turned, affine                      0.08 mm (0.19 max), 2.5 s   0.18 mm (0.33), 12.5 s
    T1 turned + scaled, affine             0.08 mm (0.16 max), 2.9 s   0.19 mm (0.38), 7.9 s
    FLAIR phantom turned vs not, rigid     0.26 mm (0.51 max), 4.8 s   0.67 mm (1.39), 14.9 s
    FLAIR phantom turned vs not, affine    0.15 mm (0.36 max), 8.4 s   0.40 mm (0.89), 25.8 s

(A rigid fit of the scaled head leaves 2.1 mm mean: the scale it cannot model.) With dipy's
random 20% sampling instead (not reproducible) its times were close to SimpleITK's multi-threaded
ones. Both are accurate far below the 2 mm slice grid; SimpleITK is 2-5x faster at equal
reproducibility, so pathanat uses it.

    python benchmarks/compare_registration.py --mm 3
"""

from __future__ import annotations

import argparse
import time

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from pathanat.data.register import REGISTRATION_MM
from pathanat.data.templates import T1_FILE, brain_mask, nilearn_file


def turned(data, affine, centre, angles, shift, scale=(1, 1, 1), zoom=None, shape=None):
    """``data`` carried by x -> R S (x - c) + c + t into a grid; returns (data, affine, truth)."""
    truth = np.eye(4)
    truth[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(scale)
    truth[:3, 3] = centre + np.asarray(shift) - truth[:3, :3] @ centre
    grid = affine
    if zoom is not None:
        grid = np.diag([zoom] * 3 + [1.0])
        grid[:3, 3] = centre + shift - zoom * (np.array(shape) - 1) / 2
    to_voxel = np.linalg.inv(affine) @ np.linalg.inv(truth) @ grid
    out = ndimage.affine_transform(
        data, to_voxel[:3, :3], to_voxel[:3, 3], output_shape=shape or data.shape, order=1
    )
    return out.astype(np.float32), grid, truth


def downsample(data, affine, mm):
    factor = mm / np.abs(np.diag(affine)[:3])
    smooth = ndimage.gaussian_filter(data, (factor - 1) / 2)
    shape = tuple(int(n) for n in np.array(data.shape) // factor)
    scale = np.diag([*factor, 1.0])
    out = ndimage.affine_transform(smooth, scale[:3, :3], output_shape=shape, order=1)
    return out.astype(np.float32), affine @ scale


def sitk_register(fixed, fixed_affine, moving, moving_affine, kind):
    import SimpleITK as sitk  # noqa: N813

    from pathanat.data.register import _matrix, _optimise, _to_sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    f, m = _to_sitk(fixed, fixed_affine), _to_sitk(moving, moving_affine)
    start = sitk.CenteredTransformInitializer(
        f, m, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    rigid = sitk.Euler3DTransform(_optimise(f, m, start))
    if kind == "rigid":
        return _matrix(rigid)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    return _matrix(sitk.AffineTransform(_optimise(f, m, affine)))


def dipy_register(fixed, fixed_affine, moving, moving_affine, kind):
    from dipy.align.imaffine import (
        AffineRegistration,
        MutualInformationMetric,
        transform_centers_of_mass,
    )
    from dipy.align.transforms import AffineTransform3D, RigidTransform3D, TranslationTransform3D

    reg = AffineRegistration(
        metric=MutualInformationMetric(nbins=32, sampling_proportion=None),
        level_iters=[200, 100, 50],
        sigmas=[2.0, 1.0, 0.0],
        factors=[4, 2, 1],
        verbosity=0,
    )
    found = transform_centers_of_mass(fixed, fixed_affine, moving, moving_affine).affine
    stages = [TranslationTransform3D(), RigidTransform3D()]
    stages += [AffineTransform3D()] if kind == "affine" else []
    for stage in stages:
        found = reg.optimize(
            fixed,
            moving,
            stage,
            None,
            static_grid2world=fixed_affine,
            moving_grid2world=moving_affine,
            starting_affine=found,
        ).affine
    return found  # static (template) world -> moving world, as SimpleITK's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mm", type=float, default=REGISTRATION_MM)
    args = parser.parse_args()
    libraries = {"SimpleITK": sitk_register}
    try:
        import dipy  # noqa: F401

        libraries["dipy"] = dipy_register
    except ImportError:
        print("dipy is not installed (pip install dipy): SimpleITK only")

    img = nib.load(nilearn_file(T1_FILE))
    brain = brain_mask()
    t1 = np.asarray(img.dataobj, np.float32) * brain
    centre = (img.affine @ np.r_[np.array(t1.shape) / 2, 1])[:3]
    idx = np.argwhere(brain[::4, ::4, ::4]) * 4
    points = img.affine @ np.c_[idx, np.ones(len(idx))].T

    def error(found, truth):
        d = np.linalg.norm((found @ points - truth @ points)[:3], axis=0)
        return f"{d.mean():.2f} mm mean ({d.max():.2f} max)"

    fixed, fixed_affine = downsample(t1, img.affine, args.mm)
    noise = np.random.default_rng(0)
    print(f"{'case':<40} {'library':<10} {'kind':<7} {'error':<24} {'s':>6}")
    for name, angles, shift, scale in (
        ("T1 turned", (12, -5, 8), (15, -12, 10), (1, 1, 1)),
        ("T1 turned + scaled", (-10, 14, -6), (-18, 10, 14), (1.05, 0.97, 1.02)),
    ):
        data, grid, truth = turned(
            t1,
            img.affine,
            centre,
            angles,
            np.array(shift, float),
            scale,
            zoom=1.5,
            shape=(130, 150, 130),
        )
        data *= 1 + 0.1 * noise.normal(size=data.shape) * (data > 0)
        moving, moving_affine = downsample(data, grid, args.mm)
        for library, register in libraries.items():
            for kind in ("rigid", "affine"):
                start = time.perf_counter()
                found = register(fixed, fixed_affine, moving, moving_affine, kind)
                print(
                    f"{name:<40} {library:<10} {kind:<7} {error(found, truth):<24} "
                    f"{time.perf_counter() - start:>6.1f}",
                    flush=True,
                )

    from pathanat.data.phantom import make_subject

    subject = make_subject("ms", 3, 0, slab_mm=None)
    flair = subject.image * subject.brain_mask
    rotated, _, truth = turned(flair, subject.affine, centre, (-12, 8, 10), (12.0, -15.0, 18.0))
    a = downsample(flair, subject.affine, args.mm)
    b = downsample(rotated, subject.affine, args.mm)
    for library, register in libraries.items():
        for kind in ("rigid", "affine"):
            start = time.perf_counter()
            found_a = register(fixed, fixed_affine, *a, kind)
            found_b = register(fixed, fixed_affine, *b, kind)
            seconds = (time.perf_counter() - start) / 2
            print(
                f"{'FLAIR phantom turned vs unturned':<40} {library:<10} {kind:<7} "
                f"{error(found_b, truth @ found_a):<24} {seconds:>6.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
