"""Find the subjects of a cohort: a BIDS-like folder or a CSV manifest, into subject records.

Only files and tables are checked here (which files exist, which ids repeat); the voxels are
checked when a volume is loaded (pathanat.data.volume).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pathanat.errors import InputError

MODALITIES = ("FLAIR", "T2w", "T1w")
MANIFEST_PATH_COLUMNS = ("image", "mask", "brain_mask", "dseg")
_NIFTI = r"\.nii(\.gz)?"
_MISSING = ("", "n/a", "na", "nan")


@dataclass(frozen=True)
class Subject:
    """One subject's files; masks are None when the cohort has none for it."""

    id: str
    image: Path
    mask: Path | None = None
    brain_mask: Path | None = None
    dseg: Path | None = None
    attributes: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Cohort:
    """The subjects of one cohort, sorted by id, and what is known of it as a whole."""

    source: Path
    layout: str  # "bids" or "csv"
    modality: str | None  # FLAIR, T2w or T1w where the file names say so
    subjects: list[Subject]
    attributes: list[str]  # attribute columns in table order

    @property
    def has_lesion(self) -> bool:
        return self.subjects[0].mask is not None

    @property
    def has_dseg(self) -> bool:
        return self.subjects[0].dseg is not None


def read_cohort(path: str | Path, modality: str | None = None) -> Cohort:
    """The cohort at ``path``: a BIDS-like folder, or a ``.csv`` manifest.

    ``modality`` picks the image among FLAIR/T2w/T1w when a BIDS cohort holds several.
    """
    path = Path(path)
    if modality is not None and modality not in MODALITIES:
        raise InputError(f"modality must be one of {', '.join(MODALITIES)}; got {modality!r}")
    if path.is_dir():
        cohort = _read_bids(path, modality)
    elif path.is_file() and path.suffix.lower() == ".csv":
        cohort = _read_manifest(path)
    elif path.exists():
        raise InputError(f"{path}: expected a cohort folder or a .csv manifest")
    else:
        raise InputError(f"{path}: no such cohort folder or manifest")
    _check_all_or_none(cohort)
    return cohort


def _read_bids(root: Path, modality: str | None) -> Cohort:
    folders = {p.name: p for p in sorted(root.glob("sub-*")) if p.is_dir()}
    table = _participants(root / "participants.tsv", list(folders))
    attributes = [c for c in table.columns if c != "participant_id"]
    found = {sid: _anat_images(folders.get(sid), sid) for sid in table["participant_id"]}
    modality = _choose_modality(root, found, modality)
    listed_in = root / "participants.tsv" if (root / "participants.tsv").exists() else root
    subjects = []
    for _, row in table.iterrows():
        sid = row["participant_id"]
        images = found[sid].get(modality, [])
        if not images:
            raise InputError(
                f"{listed_in}: participant {sid} has no image; expected "
                f"{root / sid / 'anat' / f'{sid}_{modality}.nii.gz'}"
            )
        if len(images) > 1:
            raise InputError(
                f"{root / sid / 'anat'}: {len(images)} {modality} images "
                f"({', '.join(p.name for p in images)}); expected exactly one"
            )
        anat = images[0].parent
        subjects.append(
            Subject(
                id=sid,
                image=images[0],
                mask=_one(anat, sid, "label-lesion_mask"),
                brain_mask=_one(anat, sid, "desc-brain_mask"),
                dseg=_one(anat, sid, "dseg"),
                attributes={a: _value(row[a]) for a in attributes},
            )
        )
    return Cohort(root, "bids", modality, sorted(subjects, key=lambda s: s.id), attributes)


def _participants(tsv: Path, folders: list[str]) -> pd.DataFrame:
    """participants.tsv, or one row per sub-* folder when the cohort has no table."""
    if not tsv.exists():
        if not folders:
            raise InputError(f"{tsv.parent}: no participants.tsv and no sub-* folders")
        return pd.DataFrame({"participant_id": folders})
    table = _read_table(tsv, sep="\t")
    if "participant_id" not in table.columns:
        raise InputError(f"{tsv}: expected a participant_id column; found {list(table.columns)}")
    _check_unique(table["participant_id"], tsv)
    unlisted = sorted(set(folders) - set(table["participant_id"]))
    if unlisted:
        raise InputError(
            f"{tsv}: folders {', '.join(unlisted[:5])} have no row; expected one row per subject"
        )
    return table


def _anat_images(folder: Path | None, sid: str) -> dict[str, list[Path]]:
    """The images of one subject per modality suffix (entities such as acq- are allowed)."""
    out: dict[str, list[Path]] = {}
    if folder is None or not (folder / "anat").is_dir():
        return out
    for p in sorted((folder / "anat").iterdir()):
        for m in MODALITIES:
            if re.fullmatch(rf"{re.escape(sid)}(_[^/]+)?_{m}{_NIFTI}", p.name):
                out.setdefault(m, []).append(p)
    return out


def _choose_modality(
    root: Path, found: dict[str, dict[str, list[Path]]], modality: str | None
) -> str:
    present = [m for m in MODALITIES if any(m in f for f in found.values())]
    if modality is not None:
        if modality not in present:
            raise InputError(f"{root}: no {modality} images; the cohort has {present or 'none'}")
        return modality
    if not present:
        raise InputError(
            f"{root}: no images; expected sub-*/anat/sub-*_{{{','.join(MODALITIES)}}}.nii.gz"
        )
    if len(present) > 1:
        raise InputError(
            f"{root}: several modalities ({', '.join(present)}); choose one with --modality"
        )
    return present[0]


def _one(anat: Path, sid: str, suffix: str) -> Path | None:
    hits = [p for p in sorted(anat.iterdir())
            if re.fullmatch(rf"{re.escape(sid)}(_[^/]+)?_{suffix}{_NIFTI}", p.name)]
    if len(hits) > 1:
        raise InputError(
            f"{anat}: {len(hits)} files end in _{suffix} ({', '.join(p.name for p in hits)}); "
            "expected at most one"
        )
    return hits[0] if hits else None


def _read_manifest(csv: Path) -> Cohort:
    table = _read_table(csv, sep=",")
    missing = [c for c in ("subject", "image") if c not in table.columns]
    if missing:
        raise InputError(f"{csv}: missing column(s) {missing}; expected at least subject,image")
    _check_unique(table["subject"], csv)
    attributes = [c for c in table.columns if c not in ("subject", *MANIFEST_PATH_COLUMNS)]
    subjects = []
    for i, row in table.iterrows():
        sid = str(row["subject"]).strip()
        if _value(row["image"]) is None:
            raise InputError(f"{csv}: row {i + 2} (subject {sid}) has no image")
        paths = {c: _manifest_path(csv, row, c) for c in MANIFEST_PATH_COLUMNS if c in table}
        subjects.append(Subject(
            id=sid,
            image=paths["image"],
            mask=paths.get("mask"),
            brain_mask=paths.get("brain_mask"),
            dseg=paths.get("dseg"),
            attributes={a: _value(row[a]) for a in attributes},
        ))
    modality = _modality_from_names([s.image for s in subjects])
    return Cohort(csv, "csv", modality, sorted(subjects, key=lambda s: s.id), attributes)


def _manifest_path(csv: Path, row: pd.Series, column: str) -> Path | None:
    value = _value(row[column])
    if value is None:
        return None
    path = (csv.parent / str(value)).resolve()
    if not path.is_file():
        raise InputError(
            f"{csv}: {column} of subject {row['subject']} is {value}, but {path} does not exist"
        )
    return path


def _modality_from_names(images: list[Path]) -> str | None:
    """The modality every image name states as its BIDS suffix, else None."""
    found = {m for p in images for m in MODALITIES if re.search(rf"_{m}{_NIFTI}$", p.name)}
    return found.pop() if len(found) == 1 else None


def _read_table(path: Path, sep: str) -> pd.DataFrame:
    try:
        # Everything as text first so ids like 0001 keep their zeros; numbers are parsed after.
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: cannot read the table ({err})") from err
    if table.empty:
        raise InputError(f"{path}: the table has no rows")
    return table


def _check_unique(ids: pd.Series, path: Path) -> None:
    dup = sorted(set(ids[ids.duplicated()]))
    if dup:
        raise InputError(f"{path}: duplicate subject id(s) {', '.join(map(str, dup))}")


def _value(text: object) -> object:
    """A table cell as int, float or str; BIDS 'n/a' and empty cells as None."""
    s = str(text).strip()
    if s.lower() in _MISSING:
        return None
    for kind in (int, float):
        try:
            return kind(s)
        except ValueError:
            pass
    return s


def _check_all_or_none(cohort: Cohort) -> None:
    """Lesion masks and dsegs exist for every subject or for none: the cache keeps one array."""
    for kind, what in (("mask", "lesion mask"), ("dseg", "dseg")):
        have = [s.id for s in cohort.subjects if getattr(s, kind) is not None]
        if have and len(have) < len(cohort.subjects):
            lacking = [s.id for s in cohort.subjects if getattr(s, kind) is None]
            raise InputError(
                f"{cohort.source}: {len(have)} of {len(cohort.subjects)} subjects have a {what} "
                f"(none for {', '.join(lacking[:5])}); expected all or none"
            )
