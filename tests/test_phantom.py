"""The phantom cohort against truths it does not compute itself: anatomy known from the MNI152
atlas literature, analytic flows, the written files read back, and its own generating factors."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.linalg
from scipy import ndimage as ndi

from pathanat.data import phantom
from pathanat.data.phantom import (
    CSF,
    GM,
    HIPPOCAMPUS,
    VENTRICLES,
    WM,
    draw_factors,
    generate_cohort,
    render_subject,
)
from pathanat.data.templates import load_template, nilearn_file, world_to_voxel
from pathanat.errors import PathanatError


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def template():
    return load_template()


@pytest.fixture(scope="module")
def ms_subject(template):
    # Many lesions, so that placement statistics are meaningful for this one subject.
    factors = draw_factors("ms", 0, 0) | {"lesion_rate": 40.0, "lesion_mean_diameter_mm": 5.0}
    return render_subject("ms", factors, 48.0, template)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohorts")
    # a in two worker processes, b in this one: the cohort must not depend on it
    for name, n, workers in (("a", 2, 2), ("b", 2, 1), ("c", 4, 2)):
        generate_cohort("ms", n, root / name, seed=3, slab_mm=12.0, progress=False,
                        workers=workers)
    return root


def test_template_structures_are_where_anatomy_puts_them(template):
    vent = template.ventricles > 0.5
    hippo = template.hippocampus > 0.5
    # Adult lateral ventricles hold roughly 10-40 ml; each hippocampus roughly 2.5-5 ml.
    assert 10_000 < vent.sum() < 40_000
    ijk = np.argwhere(hippo)
    x = (np.c_[ijk, np.ones(len(ijk))] @ template.affine.T)[:, 0]
    assert 2_500 < (x < 0).sum() < 5_000 and 2_500 < (x > 0).sum() < 5_000
    assert np.all((np.abs(x) > 14) & (np.abs(x) < 42))
    assert np.all(template.csf[vent] > 0.1) and np.all(template.gm[hippo] > 0.5)
    centre = world_to_voxel(template.affine, np.array([0.0, -18.0, 18.0]))[0]
    assert np.linalg.norm(np.argwhere(vent).mean(0) - centre) < 15


def test_exponentiate_matches_the_matrix_exponential_of_a_linear_field():
    # The flow of v(x) = A x for time 1 is expm(A) x: an analytic truth for scaling and squaring.
    a = np.array([[0.05, 0.02, 0.0], [-0.03, 0.04, 0.01], [0.0, 0.02, -0.06]])
    grid = np.indices((24, 24, 24), dtype=np.float64)
    centred = np.moveaxis(grid, 0, -1) - 11.5
    mm = centred * phantom.WARP_GRID_MM
    disp = phantom.exponentiate(mm @ a.T, steps=7)
    expected = mm @ (scipy.linalg.expm(a) - np.eye(3)).T
    inner = (slice(8, 16),) * 3  # far from the clamped border
    np.testing.assert_allclose(disp[inner], expected[inner], atol=0.02)


def test_warp_is_diffeomorphic_at_the_largest_factors(template):
    factors = draw_factors("ad", 0, 0) | {
        "warp_mm": phantom.ANATOMY_RANGES["warp_mm"][1],
        "ventricle_mm": phantom.ANATOMY_RANGES["ventricle_mm"][1],
        "atrophy_severity": 1.0,
    }
    disp = phantom.exponentiate(phantom.velocity_field(factors, template, (30, 150)))
    jac = np.eye(3) + np.stack(
        [np.stack(np.gradient(disp[..., d], phantom.WARP_GRID_MM), -1) for d in range(3)], -2
    )
    det = np.linalg.det(jac)
    assert det.min() > 0.0
    assert np.abs(disp).max() > 3.0  # the warp really moves tissue


def test_lesions_sit_in_white_matter_inside_the_brain(ms_subject):
    lesion = ms_subject.lesion_mask.astype(bool)
    assert lesion.sum() > 500 and lesion.sum() == ms_subject.factors["lesion_volume_mm3"]
    assert 10 <= ms_subject.factors["lesion_count"] <= ms_subject.factors["lesions_drawn"]
    assert ms_subject.brain_mask[lesion].all()
    assert np.all(ms_subject.dseg[lesion] == WM)
    assert not np.isin(ms_subject.dseg[lesion], [CSF, VENTRICLES, GM, HIPPOCAMPUS]).any()


def test_lesions_are_brighter_than_the_white_matter_around_them(ms_subject):
    image, dseg = ms_subject.image, ms_subject.dseg
    components, n = ndi.label(ms_subject.lesion_mask)
    assert n >= 10
    for i, box in enumerate(ndi.find_objects(components), start=1):
        box = tuple(slice(max(s.start - 4, 0), s.stop + 4) for s in box)
        lesion = components[box] == i
        ring = ndi.binary_dilation(lesion, iterations=3) & (dseg[box] == WM)
        ring &= ms_subject.lesion_mask[box] == 0
        if ring.sum() >= 10:
            # Fragments clipped to a few voxels are partial-volume edges: brighter, not by much.
            margin = 1.1 if lesion.sum() >= 10 else 1.0
            assert image[box][lesion].mean() > margin * image[box][ring].mean(), f"lesion {i}"


def test_lesions_favour_periventricular_white_matter(ms_subject):
    near = ndi.distance_transform_edt(ms_subject.dseg != VENTRICLES) <= 6.0
    wm = ms_subject.dseg == WM
    lesion = ms_subject.lesion_mask.astype(bool)
    # Lesion voxels are far more often periventricular than WM voxels are.
    assert (lesion & near).sum() / lesion.sum() > 2 * (wm & near).sum() / wm.sum()


def test_flair_and_t1_contrasts(ms_subject, template):
    ad = render_subject("ad", draw_factors("ad", 1, 0), 24.0, template)
    # Ventricles are pure CSF; sulcal CSF is mostly partial volume.
    for subject, (darker, brighter) in ((ms_subject, (WM, GM)), (ad, (GM, WM))):
        median = {k: np.median(subject.image[subject.dseg == k]) for k in (VENTRICLES, GM, WM)}
        assert median[VENTRICLES] < 0.6 * median[darker] < 0.6 * median[brighter]
        assert median[darker] < median[brighter]


def test_atrophy_grows_ventricles_and_shrinks_grey_matter(template):
    factors = draw_factors("ad", 5, 0)
    volumes = [
        render_subject("ad", factors | {"atrophy_severity": s}, 48.0, template).factors
        for s in (0.0, 0.5, 1.0)
    ]
    ventricles = [v["ventricles_mm3"] for v in volumes]
    assert np.all(np.diff(ventricles) > 0) and ventricles[-1] > 1.5 * ventricles[0]
    assert np.all(np.diff([v["hippocampus_mm3"] for v in volumes]) < 0)
    assert np.all(np.diff([v["gm_mm3"] for v in volumes]) < 0)
    assert np.all(np.diff([v["csf_mm3"] for v in volumes]) > 0)


def test_subjects_differ_in_anatomy_yet_stay_brain_like(template):
    k0, k1 = phantom.slab_range(template, 24.0)
    reference = template.brain[:, :, k0:k1]
    subjects = [render_subject("ms", draw_factors("ms", i, 0), 24.0, template) for i in (0, 1)]
    masks = [s.brain_mask > 0 for s in subjects]
    assert dice(*masks) < 0.97
    assert all(dice(m, reference) > 0.8 for m in masks)


def check_slab_within(template, thin_mm: float, thick_mm: float | None) -> None:
    """The thin slab's anatomy equals the thick one's at the same world z."""
    factors = draw_factors("ad", 2, 0)
    thin = render_subject("ad", factors, thin_mm, template)
    thick = render_subject("ad", factors, thick_mm, template)
    k0, k1 = phantom.slab_range(template, thin_mm)
    t0, _ = phantom.slab_range(template, thick_mm)
    assert thin.dseg.shape == (*template.shape[:2], round(thin_mm))
    # Voxel (i, j, 0) of a slab is at the world position of template voxel (i, j, k0).
    np.testing.assert_allclose(thin.affine @ [5, 7, 0, 1], template.affine @ [5, 7, k0, 1])
    np.testing.assert_allclose(thick.affine @ [5, 7, 0, 1], template.affine @ [5, 7, t0, 1])
    assert (thin.dseg == thick.dseg[:, :, k0 - t0 : k1 - t0]).mean() > 0.999
    zs = np.flatnonzero(template.brain.any(axis=(0, 1)))
    assert abs((k0 + k1) / 2 - (zs[0] + zs[-1] + 1) / 2) <= 0.5


def test_slab_lies_at_the_template_world_z(template):
    check_slab_within(template, 12.0, 24.0)


@pytest.mark.slow
def test_slab_is_the_whole_volume_at_its_slices(template):
    assert phantom.slab_range(template, None) == (0, template.shape[2])
    check_slab_within(template, 16.0, None)


def test_cohort_files_follow_the_contract(cohorts, template):
    root = cohorts / "a"
    table = pd.read_csv(root / "participants.tsv", sep="\t")
    assert list(table.participant_id) == ["sub-0000", "sub-0001"]
    sidecar = json.loads((root / "participants.json").read_text())
    assert set(sidecar) == set(table.columns)
    description = json.loads((root / "dataset_description.json").read_text())
    assert description["BIDSVersion"] == "1.9.0" and description["DatasetType"] == "raw"
    meta = json.loads((root / "phantom.json").read_text())
    assert meta["seed"] == 3 and meta["kind"] == "ms"
    for source in meta["sources"]:
        path = nilearn_file(source["path"].rsplit("/", 1)[1])
        assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (root / "dseg.tsv").read_text().splitlines()[4] == "3\tgm"
    anat = root / "sub-0001" / "anat"
    images = {
        suffix: nib.load(anat / f"sub-0001_{suffix}.nii.gz")
        for suffix in ("FLAIR", "label-lesion_mask", "desc-brain_mask", "dseg")
    }
    for suffix, img in images.items():
        assert img.shape == (*template.shape[:2], 12)
        np.testing.assert_array_equal(img.affine, images["FLAIR"].affine)
        assert img.header.get_zooms() == (1.0, 1.0, 1.0)
        assert img.get_data_dtype() == (np.float32 if suffix == "FLAIR" else np.uint8)
    lesion = np.asarray(images["label-lesion_mask"].dataobj)
    assert lesion.sum() == table.lesion_volume_mm3[1]


def test_participants_table_regenerates_each_subject(cohorts):
    root = cohorts / "a"
    table = pd.read_csv(root / "participants.tsv", sep="\t")
    row = table.iloc[1].to_dict()
    factors = {k: v for k, v in row.items() if k in draw_factors("ms", 0, 0)}
    subject = render_subject("ms", factors, 12.0)
    written = nib.load(root / "sub-0001" / "anat" / "sub-0001_FLAIR.nii.gz").get_fdata()
    np.testing.assert_array_equal(subject.image, written)


def test_same_seed_same_bytes_whatever_the_workers_and_subjects_do_not_depend_on_cohort_size(
    cohorts,
):
    a, b, c = (cohorts / n for n in "abc")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 5 + 2 * 4
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
        if rel.parts[0].startswith("sub-"):
            assert (a / rel).read_bytes() == (c / rel).read_bytes(), rel
    rows_a = pd.read_csv(a / "participants.tsv", sep="\t")
    rows_c = pd.read_csv(c / "participants.tsv", sep="\t")
    pd.testing.assert_frame_equal(rows_a, rows_c.iloc[:2])
    assert not rows_c.iloc[2:].drop(columns="participant_id").duplicated().any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "xx"}, "kind"),
        ({"n_subjects": 0}, "subjects"),
        ({"seed": -1}, "seed"),
        ({"slab_mm": 2.0}, "slab"),
    ],
)
def test_user_errors_are_named(tmp_path, kwargs, message):
    args = {"kind": "ms", "n_subjects": 1, "out_dir": tmp_path / "c", "progress": False} | kwargs
    with pytest.raises(PathanatError, match=message):
        generate_cohort(**args)
    assert not (tmp_path / "c").exists()


def test_existing_output_is_kept_without_overwrite(tmp_path):
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PathanatError, match="exists"):
        generate_cohort("ms", 1, out, slab_mm=8.0, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_writes_a_cohort(tmp_path, capsys):
    from pathanat.cli import main

    out = tmp_path / "ad"
    assert main(["phantom", "--kind", "ad", "--subjects", "1", "--out", str(out),
                 "--slab-mm", "8", "--quiet"]) == 0
    assert (out / "sub-0000" / "anat" / "sub-0000_T1w.nii.gz").is_file()
    assert not (out / "sub-0000" / "anat" / "sub-0000_label-lesion_mask.nii.gz").exists()
    assert main(["phantom", "--kind", "ad", "--subjects", "1", "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
