"""BIDS as it comes: names parsed into entities, sessions, runs, derivatives, the two tables.

Each tree is written here file by file, so the truth (which file is whose, which run is the
highest, which mask belongs to which image) is known by construction; the volumes are tiny.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pathanat.cli import main
from pathanat.data.bids import parse_name
from pathanat.data.cohort import read_cohort
from pathanat.errors import InputError

AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


@pytest.mark.parametrize(
    ("name", "entities", "suffix"),
    [
        ("sub-01_FLAIR.nii.gz", {"sub": "01"}, "FLAIR"),
        (
            "sub-01_ses-2_acq-3d_run-02_T1w.nii",
            {"sub": "01", "ses": "2", "acq": "3d", "run": "02"},
            "T1w",
        ),
        (
            "sub-A1_ses-pre_space-orig_label-lesion_mask.nii.gz",
            {"sub": "A1", "ses": "pre", "space": "orig", "label": "lesion"},
            "mask",
        ),
        ("sub-01_desc-brain_mask.nii.gz", {"sub": "01", "desc": "brain"}, "mask"),
    ],
)
def test_names_are_parsed_into_entities_and_suffix(name, entities, suffix):
    parsed = parse_name(name)
    assert parsed == (entities, suffix)
    assert list(parsed[0]) == list(entities)  # file order kept


@pytest.mark.parametrize(
    "name",
    [
        "sub-01_FLAIR.json",  # a sidecar, not an image
        "FLAIR.nii.gz",  # no entities
        "ses-01_sub-01_T1w.nii.gz",  # sub must come first
        "sub-01_run-a_T1w.nii.gz",  # run is an index
        "sub-01_sub-02_T1w.nii.gz",  # an entity twice
        "sub-01_acq_T1w.nii.gz",  # a key without a label
        "sub-01_acq-3-d_T1w.nii.gz",  # labels are alphanumeric
        "sub-01_T1-w.nii.gz",
    ],
)
def test_names_that_are_not_bids_are_refused(name):
    assert parse_name(name) is None


def touch(root: Path, relative: str) -> Path:
    """A tiny NIfTI at ``root/relative`` (the name is what these tests are about)."""
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), AFFINE), path)
    return path


def session_tree(root: Path) -> Path:
    """Three participants, two sessions each; sub-01 ses-1 has run-1 and run-2; lesion masks
    under derivatives/lesions (run-specific for the two runs), brain masks under
    derivatives/skullstrip; tables with n/a and a per-session age."""
    for sub in ("01", "02", "03"):
        for ses in ("1", "2"):
            base = f"sub-{sub}/ses-{ses}/anat/sub-{sub}_ses-{ses}"
            touch(root, f"{base}_FLAIR.nii.gz")
            touch(root, f"{base}_T2w.nii.gz")
            les = f"derivatives/lesions/{base}_label-lesion_mask.nii.gz"
            touch(root, les.replace("_label", "_space-orig_label") if sub == "03" else les)
            touch(root, f"derivatives/skullstrip/{base}_desc-brain_mask.nii.gz")
        pd.DataFrame(
            {"session_id": ["ses-1", "ses-2"], "age": [50 + int(sub), "n/a"], "edss": [2.5, 3.0]}
        ).to_csv(root / f"sub-{sub}" / f"sub-{sub}_sessions.tsv", sep="\t", index=False)
    base = "sub-01/ses-1/anat/sub-01_ses-1"
    (root / f"{base}_FLAIR.nii.gz").rename(root / f"{base}_run-1_FLAIR.nii.gz")
    touch(root, f"{base}_run-2_FLAIR.nii.gz")
    les = root / f"derivatives/lesions/{base}_label-lesion_mask.nii.gz"
    les.rename(les.with_name("sub-01_ses-1_run-1_label-lesion_mask.nii.gz"))
    touch(root, f"derivatives/lesions/{base}_run-2_label-lesion_mask.nii.gz")
    touch(
        root,
        "derivatives/lesions/sub-02/ses-1/anat/sub-02_ses-1_space-MNI152_label-lesion_mask.nii.gz",
    )  # another grid: never a match
    (root / "sub-01/ses-1/anat/sub-01_ses-1_run-2_FLAIR.json").write_text("{}")
    pd.DataFrame(
        {
            "participant_id": ["sub-01", "sub-02", "sub-03"],
            "age": ["40", "n/a", "60"],
            "sex": ["F", "M", "n/a"],
        }
    ).to_csv(root / "participants.tsv", sep="\t", index=False)
    return root


def test_sessions_runs_and_derivatives_are_chosen_by_rule(tmp_path):
    root = session_tree(tmp_path / "bids")
    cohort = read_cohort(root, "FLAIR")
    assert [s.id for s in cohort.subjects] == [
        f"sub-{p}_ses-{s}" for p in ("01", "02", "03") for s in ("1", "2")
    ]
    assert cohort.has_sessions and cohort.modality == "FLAIR"
    by_id = {s.id: s for s in cohort.subjects}
    first = by_id["sub-01_ses-1"]
    assert (first.participant, first.session) == ("sub-01", "ses-1")
    # The highest run is kept, the other recorded; its run-2 lesion mask is the one paired.
    assert first.image.name == "sub-01_ses-1_run-2_FLAIR.nii.gz"
    assert first.entities == {"sub": "01", "ses": "1", "run": "2"}
    assert cohort.passed_over == {"sub-01_ses-1": ["sub-01_ses-1_run-1_FLAIR.nii.gz"]}
    assert first.mask.name == "sub-01_ses-1_run-2_label-lesion_mask.nii.gz"
    assert first.mask.parent == root / "derivatives/lesions/sub-01/ses-1/anat"
    assert first.brain_mask.parent == root / "derivatives/skullstrip/sub-01/ses-1/anat"
    # space-orig is the image's own grid; space-MNI152 is not, so it is passed over.
    assert by_id["sub-03_ses-2"].mask.name == "sub-03_ses-2_space-orig_label-lesion_mask.nii.gz"
    assert by_id["sub-02_ses-1"].mask.name == "sub-02_ses-1_label-lesion_mask.nii.gz"
    assert first.sources == {"lesion": "derivatives/lesions/", "brain": "derivatives/skullstrip/"}
    # participants.tsv and sessions.tsv both reach the sample; n/a is missing; a session's own
    # value stands, the participant's where the session has none.
    assert cohort.attributes == ["age", "sex", "edss"]
    assert first.attributes == {"age": 51, "sex": "F", "edss": 2.5}
    assert by_id["sub-01_ses-2"].attributes == {"age": 40, "sex": "F", "edss": 3.0}
    assert by_id["sub-02_ses-2"].attributes == {"age": None, "sex": "M", "edss": 3.0}
    assert by_id["sub-03_ses-1"].attributes["sex"] is None
    # The other contrast is a choice too. Its sub-01 ses-1 image states no run, so the masks
    # that state run-1 and run-2 are not its own: the session has no lesion mask.
    with pytest.raises(
        InputError,
        match=r"sub-01_ses-1_label-lesion_mask\.nii\.gz: missing; 5 "
        r"of 6 samples .* none for sub-01_ses-1",
    ):
        read_cohort(root, "T2w")


def test_an_entity_choice_picks_among_acquisitions(tmp_path):
    root = tmp_path / "bids"
    for sub in ("01", "02", "03"):
        touch(root, f"sub-{sub}/anat/sub-{sub}_acq-2d_FLAIR.nii.gz")
        touch(root, f"sub-{sub}/anat/sub-{sub}_acq-3d_FLAIR.nii.gz")
        touch(root, f"sub-{sub}/anat/sub-{sub}_acq-3d_label-lesion_mask.nii.gz")
        touch(root, f"sub-{sub}/anat/sub-{sub}_acq-2d_label-lesion_mask.nii.gz")
    with pytest.raises(
        InputError,
        match=r"differ in acq \(acq-2d, acq-3d\); choose one with "
        r"--entity acq=LABEL",
    ):
        read_cohort(root)
    with pytest.raises(InputError, match=r"no FLAIR image has acq-3D; they have acq-2d, acq-3d"):
        read_cohort(root, entities={"acq": "3D"})
    with pytest.raises(InputError, match=r"no FLAIR image has rec-norm; they have none states rec"):
        read_cohort(root, entities={"rec": "norm"})
    cohort = read_cohort(root, entities={"acq": "3d"})
    assert not cohort.has_sessions
    for s in cohort.subjects:
        assert s.id == s.participant and s.session is None
        assert "acq-3d" in s.image.name and "acq-3d" in s.mask.name


def remove(root: Path, relative: str) -> Path:
    path = root / relative
    path.unlink()
    return path


def test_a_missing_derivative_is_one_clear_line_naming_the_file(tmp_path, capsys):
    root = session_tree(tmp_path / "bids")
    remove(root, "derivatives/lesions/sub-02/ses-2/anat/sub-02_ses-2_label-lesion_mask.nii.gz")
    expected = root / "derivatives/lesions/sub-02/ses-2/anat/sub-02_ses-2_label-lesion_mask.nii.gz"
    with pytest.raises(InputError) as err:
        read_cohort(root, "FLAIR")
    message = str(err.value)
    assert message.startswith(f"{expected}: missing;")
    assert "5 of 6 samples have a lesion mask in derivatives/lesions/, none for sub-02_ses-2" in (
        message
    )
    # The command says it in one line and writes nothing.
    code = main(
        [
            "prepare",
            "--cohort",
            str(root),
            "--out",
            str(tmp_path / "cache"),
            "--suffix",
            "FLAIR",
            "--quiet",
        ]
    )
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err_lines) == 1 and str(expected) in err_lines[0]
    assert not (tmp_path / "cache").exists()


def test_a_pipeline_missing_a_brain_mask_is_an_error_but_raw_ones_may_be_partial(tmp_path):
    root = session_tree(tmp_path / "bids")
    remove(root, "derivatives/skullstrip/sub-03/ses-1/anat/sub-03_ses-1_desc-brain_mask.nii.gz")
    with pytest.raises(
        InputError,
        match=r"sub-03_ses-1_desc-brain_mask\.nii\.gz: missing; 5 of 6 "
        r"samples have a brain mask",
    ):
        read_cohort(root, "FLAIR")
    flat = tmp_path / "flat"
    for sub in ("01", "02", "03"):
        touch(flat, f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz")
    touch(flat, "sub-02/anat/sub-02_desc-brain_mask.nii.gz")
    brains = [s.brain_mask for s in read_cohort(flat).subjects]
    assert brains[0] is None and brains[1].name == "sub-02_desc-brain_mask.nii.gz"


def test_masks_in_two_pipelines_need_a_choice(tmp_path):
    root = session_tree(tmp_path / "bids")
    for p in ("01", "02", "03"):
        for s in ("1", "2"):
            touch(
                root,
                f"derivatives/manual/sub-{p}/ses-{s}/anat/sub-{p}_ses-{s}_label-lesion_mask.nii.gz",
            )
    with pytest.raises(
        InputError,
        match=r"its lesion mask is found in derivatives/lesions, "
        r"derivatives/manual; choose the pipeline with "
        r"--derivatives NAME",
    ):
        read_cohort(root, "FLAIR")
    manual = read_cohort(root, "FLAIR", derivatives=["manual", "skullstrip"])
    assert all("derivatives/manual/" in str(s.mask) for s in manual.subjects)
    assert all("derivatives/skullstrip/" in str(s.brain_mask) for s in manual.subjects)
    with pytest.raises(
        InputError,
        match=r"derivatives/fmriprep: no such pipeline; the dataset "
        r"has lesions, manual, skullstrip",
    ):
        read_cohort(root, "FLAIR", derivatives=["fmriprep"])


def test_layout_errors_name_the_file(tmp_path):
    root = session_tree(tmp_path / "bids")
    with pytest.raises(
        InputError, match="several modalities \\(FLAIR, T2w\\); choose one with --suffix"
    ):
        read_cohort(root)
    with pytest.raises(InputError, match=r"no PDw images; the dataset has \['FLAIR', 'T2w'\]"):
        read_cohort(root, "PDw")
    stray = touch(root, "sub-02/ses-1/anat/sub-03_ses-1_T1w.nii.gz")
    with pytest.raises(InputError, match="states sub-03 ses-1 but it lies in sub-02/ses-1"):
        read_cohort(root, "FLAIR")
    stray.unlink()
    table = root / "sub-02" / "sub-02_sessions.tsv"
    pd.DataFrame({"session_id": ["ses-1"], "age": [3]}).to_csv(table, sep="\t", index=False)
    with pytest.raises(InputError, match=f"{table}: sessions ses-2 have no row"):
        read_cohort(root, "FLAIR")


def test_a_session_without_the_contrast_is_left_out_with_a_warning(tmp_path):
    root = session_tree(tmp_path / "bids")
    remove(root, "sub-03/ses-2/anat/sub-03_ses-2_FLAIR.nii.gz")
    for f in (root / "derivatives").rglob("sub-03_ses-2_*"):
        f.unlink()
    with pytest.warns(
        UserWarning,
        match=r"1 session\(s\) without a FLAIR image left out "
        r"\(sub-03_ses-2\)",
    ):
        cohort = read_cohort(root, "FLAIR")
    assert "sub-03_ses-2" not in [s.id for s in cohort.subjects]
    assert cohort.without_image == ["sub-03_ses-2"]


def test_csv_sessions_are_samples_of_one_participant(tmp_path):
    for name in ("a1", "a2", "b1"):
        touch(tmp_path, f"img/{name}_FLAIR.nii.gz")
    pd.DataFrame(
        {
            "subject": ["a", "a", "b"],
            "session": ["1", "2", "n/a"],
            "image": ["img/a1_FLAIR.nii.gz", "img/a2_FLAIR.nii.gz", "img/b1_FLAIR.nii.gz"],
            "age": [30, 31, 40],
        }
    ).to_csv(tmp_path / "cohort.csv", index=False)
    cohort = read_cohort(tmp_path / "cohort.csv")
    assert [(s.id, s.participant, s.session) for s in cohort.subjects] == [
        ("a_1", "a", "1"),
        ("a_2", "a", "2"),
        ("b", "b", None),
    ]
    assert cohort.attributes == ["age"] and cohort.has_sessions
