"""Find the samples of a cohort: a BIDS dataset or a CSV manifest, into sample records.

A sample is one image with its masks: a participant's session, or the participant when the
cohort has no sessions. The BIDS naming rules live in pathanat.data.bids. Only files and tables
are checked here (which files exist, which ids repeat); the voxels are checked when a volume is
loaded (pathanat.data.volume).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pathanat.data import bids
from pathanat.errors import InputError

MODALITIES = bids.IMAGE_SUFFIXES
MANIFEST_PATH_COLUMNS = ("image", "mask", "brain_mask", "dseg")
_NIFTI = r"\.nii(\.gz)?"
_MISSING = ("", "n/a", "na", "nan")


@dataclass(frozen=True)
class Subject:
    """One sample's files; masks are None when the cohort has none for it.

    ``id`` names the sample (``sub-01_ses-02`` for a session); ``participant`` the person it
    belongs to, the unit of the train/val/test split.
    """

    id: str
    image: Path
    mask: Path | None = None
    brain_mask: Path | None = None
    dseg: Path | None = None
    attributes: dict[str, object] = field(default_factory=dict)
    participant: str = ""  # "" = the sample's own id
    session: str | None = None
    entities: dict[str, str] = field(default_factory=dict)  # of the image's BIDS name
    sources: dict[str, str] = field(default_factory=dict)  # kind -> anat/ or derivatives/NAME/

    def __post_init__(self) -> None:
        if not self.participant:
            object.__setattr__(self, "participant", self.id)


@dataclass(frozen=True)
class Cohort:
    """The samples of one cohort, sorted by id, and what is known of it as a whole."""

    source: Path
    layout: str  # "bids" or "csv"
    modality: str | None  # the image suffix (FLAIR, T2w, T1w, ...) where the file names say so
    subjects: list[Subject]
    attributes: list[str]  # attribute columns in table order
    passed_over: dict[str, list[str]] = field(default_factory=dict)  # sample -> other runs
    without_image: list[str] = field(default_factory=list)  # sessions left out

    @property
    def has_lesion(self) -> bool:
        return self.subjects[0].mask is not None

    @property
    def has_dseg(self) -> bool:
        return self.subjects[0].dseg is not None

    @property
    def has_sessions(self) -> bool:
        return any(s.session is not None for s in self.subjects)


def read_cohort(
    path: str | Path,
    modality: str | None = None,
    derivatives: Sequence[str] | None = None,
    entities: Mapping[str, str] | None = None,
) -> Cohort:
    """The cohort at ``path``: a BIDS folder, or a ``.csv`` manifest.

    ``modality`` is the image suffix to use (FLAIR, T2w, T1w, or any other a BIDS cohort holds);
    ``derivatives`` the pipelines under ``derivatives/`` that masks come from, first first;
    ``entities`` entities a BIDS image must have (e.g. ``{"acq": "3d"}``). See pathanat.data.bids.
    """
    path = Path(path)
    if path.is_dir():
        cohort = _read_bids(path, modality, derivatives, entities)
    elif path.is_file() and path.suffix.lower() == ".csv":
        if derivatives or entities:
            raise InputError(f"{path}: --derivatives and --entity apply to BIDS folders, not CSV")
        cohort = _read_manifest(path)
    elif path.exists():
        raise InputError(f"{path}: expected a cohort folder or a .csv manifest")
    else:
        raise InputError(f"{path}: no such cohort folder or manifest")
    _check_all_or_none(cohort)
    return cohort


def _read_bids(
    root: Path,
    suffix: str | None,
    derivatives: Sequence[str] | None,
    entities: Mapping[str, str] | None,
) -> Cohort:
    folders = sorted(p.name for p in root.glob("sub-*") if p.is_dir())
    table = _participants(root / "participants.tsv", folders)
    suffix, sessions, without = bids.find_sessions(root, suffix, derivatives, entities)
    listed_in = root / "participants.tsv" if (root / "participants.tsv").exists() else root
    by_participant: dict[str, list[bids.Session]] = {}
    for s in sessions:
        by_participant.setdefault(s.participant, []).append(s)
    for sid in table["participant_id"]:
        if sid not in by_participant:
            raise InputError(
                f"{listed_in}: participant {sid} has no image; expected "
                f"{root / sid / 'anat' / f'{sid}_{suffix}.nii.gz'}"
                + (" (or in its ses-* folders)" if any(root.glob(f"{sid}/ses-*")) else "")
            )
    if without:
        warnings.warn(
            f"{root}: {len(without)} session(s) without a {suffix} image left out "
            f"({', '.join(without[:5])})", stacklevel=3,
        )
    rows = table.set_index("participant_id")
    tables = {
        p: bids.session_table(root, p, [s.session for s in own if s.session is not None])
        for p, own in by_participant.items()
    }
    attributes = [c for c in table.columns if c != "participant_id"]
    for t in tables.values():
        attributes += [] if t is None else [c for c in t.columns if c not in attributes]
    subjects = []
    for s in sessions:
        values = {a: _value(rows.loc[s.participant, a]) if a in rows.columns else None
                  for a in attributes}
        own = tables[s.participant]
        if own is not None and s.session is not None:
            # A session's own value (e.g. age at the visit) stands where both tables give one.
            for column in own.columns:
                value = _value(own.loc[s.session, column])
                values[column] = value if value is not None else values[column]
        subjects.append(Subject(
            id=s.id,
            image=s.image.path,
            mask=_path(s.masks["lesion"]),
            brain_mask=_path(s.masks["brain"]),
            dseg=_path(s.masks["dseg"]),
            attributes=values,
            participant=s.participant,
            session=s.session,
            entities=dict(s.image.entities),
            sources={k: m.where for k, m in s.masks.items() if m is not None},
        ))
    return Cohort(
        root, "bids", suffix, sorted(subjects, key=lambda s: s.id), attributes,
        passed_over={s.id: s.passed_over for s in sessions if s.passed_over},
        without_image=without,
    )


def _path(file: bids.BidsFile | None) -> Path | None:
    return None if file is None else file.path


def _participants(tsv: Path, folders: list[str]) -> pd.DataFrame:
    """participants.tsv, or one row per sub-* folder when the cohort has no table."""
    if not tsv.exists():
        if not folders:
            raise InputError(f"{tsv.parent}: no participants.tsv and no sub-* folders")
        return pd.DataFrame({"participant_id": folders})
    table = bids.read_tsv(tsv, "participant_id")
    unlisted = sorted(set(folders) - set(table["participant_id"]))
    if unlisted:
        raise InputError(
            f"{tsv}: folders {', '.join(unlisted[:5])} have no row; expected one row per subject"
        )
    return table


def _read_manifest(csv: Path) -> Cohort:
    """A CSV with columns subject,image [,session,mask,brain_mask,dseg, attributes...]."""
    table = _read_table(csv, sep=",")
    missing = [c for c in ("subject", "image") if c not in table.columns]
    if missing:
        raise InputError(f"{csv}: missing column(s) {missing}; expected at least subject,image")
    has_sessions = "session" in table.columns
    ids = table["subject"].str.strip()
    if has_sessions:  # a session is one sample, named like a BIDS one: <subject>_<session>
        ids = ids + table["session"].map(lambda v: "" if _value(v) is None else f"_{v.strip()}")
    _check_unique(ids, csv)
    bookkeeping = ("subject", "session", *MANIFEST_PATH_COLUMNS)
    attributes = [c for c in table.columns if c not in bookkeeping]
    subjects = []
    for (i, row), sample in zip(table.iterrows(), ids, strict=True):
        if _value(row["image"]) is None:
            raise InputError(f"{csv}: row {i + 2} (subject {sample}) has no image")
        paths = {c: _manifest_path(csv, row, c) for c in MANIFEST_PATH_COLUMNS if c in table}
        session = _value(row["session"]) if has_sessions else None
        subjects.append(Subject(
            id=sample,
            image=paths["image"],
            mask=paths.get("mask"),
            brain_mask=paths.get("brain_mask"),
            dseg=paths.get("dseg"),
            attributes={a: _value(row[a]) for a in attributes},
            participant=str(row["subject"]).strip(),
            session=None if session is None else str(session),
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
