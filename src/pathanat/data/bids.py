"""A BIDS dataset as it comes: sessions, runs, masks under derivatives/, ``n/a`` in its tables.

File names are parsed into entities (``sub-01_ses-02_acq-3d_run-2_FLAIR.nii.gz`` -> sub=01,
ses=02, acq=3d, run=2, suffix FLAIR), and every choice is a stated rule on them:

- the image of a sample has the chosen suffix (``--suffix``; the one the dataset has when it has
  one of FLAIR/T2w/T1w) and every entity the user fixed (``--entity acq=3d``);
- when several runs of it remain, the highest run number is kept (the repeat after a failed
  acquisition is the later one); images that differ in anything else than run stop with an error
  that names the entity to fix;
- a mask (``*_label-lesion_mask``, ``*_desc-brain_mask``, ``*_dseg``) belongs to an image when its
  sub and ses equal the image's and every other source entity it states (acq, run, ...) does too;
  the one stating the most of them wins; its ``space`` must be absent or ``orig`` (the image's own
  grid). Masks come from the sample's ``anat/`` folder or from ``derivatives/<pipeline>/``, the
  same tree below it; ``pipelines`` restricts (and ranks, before raw ``anat/``) where they come
  from, and two sources for one mask without such a choice is an error;
- a sample is one session (``sub-01_ses-02``), or the participant when it has no sessions;
  ``participants.tsv`` and ``sub-*/sub-*_sessions.tsv`` give its attributes (a session's value
  stands where both give one), ``n/a`` read as missing.

Why a small parser and not pybids: prepare reads only ``anat/`` images, three kinds of mask and
two tables. pybids indexes the whole dataset into an SQL database and brings SQLAlchemy,
formulaic, bids-validator and more; the naming rules used here fit in this file and its tests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pathanat.errors import InputError

IMAGE_SUFFIXES = ("FLAIR", "T2w", "T1w")  # looked for when no suffix is chosen, in this order
MASK_KINDS = ("lesion", "brain", "dseg")
NOT_IMAGES = ("mask", "dseg", "probseg")
# Entities that describe the acquisition a file came from (BIDS "source entities"); a mask that
# states one of them must agree with its image. space, label and desc describe the derivative.
SOURCE_ENTITIES = ("acq", "ce", "rec", "run", "echo", "flip", "inv", "mt", "part", "chunk")
NATIVE_SPACES = (None, "orig")
_KEY = r"[a-z]+"
_LABEL = r"[a-zA-Z0-9]+"
_EXTENSIONS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class BidsFile:
    """One NIfTI file of the dataset with the entities, suffix and pipeline its path states."""

    path: Path
    entities: dict[str, str]
    suffix: str
    pipeline: str | None = None  # derivatives/<pipeline>, None for the raw dataset

    @property
    def sub(self) -> str:
        return self.entities["sub"]

    @property
    def ses(self) -> str | None:
        return self.entities.get("ses")

    @property
    def run(self) -> int:
        """The run index; 0 for a file that states none (so any numbered run comes later)."""
        return int(self.entities.get("run", 0))

    @property
    def where(self) -> str:
        return "anat/" if self.pipeline is None else f"derivatives/{self.pipeline}/"


def parse_name(name: str) -> tuple[dict[str, str], str] | None:
    """(entities in file order, suffix) of a BIDS NIfTI file name; None when it is not one."""
    ext = next((e for e in _EXTENSIONS if name.endswith(e)), None)
    if ext is None:
        return None
    *pairs, suffix = name[: -len(ext)].split("_")
    if not pairs or not re.fullmatch(_LABEL, suffix):
        return None
    entities: dict[str, str] = {}
    for pair in pairs:
        match = re.fullmatch(rf"({_KEY})-({_LABEL})", pair)
        if match is None or match[1] in entities:
            return None
        entities[match[1]] = match[2]
    if next(iter(entities)) != "sub" or ("run" in entities and not entities["run"].isdigit()):
        return None
    return entities, suffix


def anat_files(root: Path, pipeline: str | None = None) -> list[BidsFile]:
    """The NIfTI files in ``root``'s ``sub-*/anat`` and ``sub-*/ses-*/anat`` folders.

    A file whose sub or ses disagrees with its folders is an error (it would pair with the wrong
    sample); files that are not BIDS names (e.g. ``.json`` sidecars, notes) are passed over.
    """
    out = []
    for anat in sorted([*root.glob("sub-*/anat"), *root.glob("sub-*/ses-*/anat")]):
        folders = dict(p.split("-", 1) for p in anat.relative_to(root).parts[:-1])
        for path in sorted(anat.iterdir()):
            parsed = parse_name(path.name)
            if parsed is None:
                continue
            entities, suffix = parsed
            stated = {k: entities.get(k) for k in ("sub", "ses")}
            if stated != {"sub": folders["sub"], "ses": folders.get("ses")}:
                raise InputError(
                    f"{path}: its name states sub-{stated['sub']}"
                    + (f" ses-{stated['ses']}" if stated["ses"] else "")
                    + f" but it lies in {anat.relative_to(root).parent}; expected them to agree"
                )
            out.append(BidsFile(path, entities, suffix, pipeline))
    return out


def pipelines_of(root: Path) -> list[str]:
    """The pipelines under ``root/derivatives`` (each a folder)."""
    folder = root / "derivatives"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def mask_kind(file: BidsFile) -> str | None:
    """lesion, brain or dseg for the masks prepare reads; None for any other file."""
    if file.entities.get("space") not in NATIVE_SPACES:
        return None
    if file.suffix == "dseg":
        return "dseg"
    if file.suffix != "mask":
        return None
    if file.entities.get("label") == "lesion":
        return "lesion"
    if "brain" in (file.entities.get("desc"), file.entities.get("label")):
        return "brain"
    return None


def agrees(mask: BidsFile, image: BidsFile) -> bool:
    """A mask belongs to an image: same sub and ses, and every source entity it states equal."""
    if (mask.sub, mask.ses) != (image.sub, image.ses):
        return False
    return all(image.entities.get(k) == v for k, v in mask.entities.items() if k in SOURCE_ENTITIES)


def specificity(mask: BidsFile) -> int:
    return sum(k in SOURCE_ENTITIES for k in mask.entities)


@dataclass(frozen=True)
class Session:
    """One sample of a BIDS dataset: a participant's session (or the participant) and its files."""

    participant: str  # "sub-01"
    session: str | None  # "ses-02", None without sessions
    image: BidsFile
    masks: dict[str, BidsFile | None]
    passed_over: list[str] = field(default_factory=list)  # other runs of the image

    @property
    def id(self) -> str:
        return self.participant if self.session is None else f"{self.participant}_{self.session}"


def choose_image(
    files: list[BidsFile], where: Path, suffix: str, fixed: Mapping[str, str]
) -> tuple[BidsFile, list[BidsFile]] | None:
    """The image of one sample and the runs passed over; None when it has none."""
    hits = [f for f in files if f.suffix == suffix and _has(f, fixed)]
    if not hits:
        return None
    # Images may differ only by run: anything else (acq, rec, ...) is a choice for the user.
    for key in sorted({k for f in hits for k in f.entities} - {"sub", "ses", "run"}):
        values = sorted({f.entities.get(key, "") for f in hits})
        if len(values) > 1:
            shown = ", ".join(f"{key}-{v}" if v else f"no {key}" for v in values)
            raise InputError(
                f"{where}: {len(hits)} {suffix} images differ in {key} ({shown}); choose one "
                f"with --entity {key}=LABEL"
            )
    hits.sort(key=lambda f: f.run)
    if len({f.run for f in hits}) < len(hits):
        raise InputError(
            f"{where}: {len(hits)} {suffix} images with the same run "
            f"({', '.join(f.path.name for f in hits)}); expected one per run"
        )
    return hits[-1], hits[:-1]


def _has(file: BidsFile, fixed: Mapping[str, str]) -> bool:
    return all(file.entities.get(k) == v for k, v in fixed.items())


def choose_mask(
    image: BidsFile, candidates: list[BidsFile], ranked: Sequence[str | None], kind: str
) -> BidsFile | None:
    """The mask of ``kind`` for ``image``: the most specific match from the first source that
    has one (sources in ``ranked`` order); ties and unranked duplicates are errors."""
    matches = [m for m in candidates if mask_kind(m) == kind and agrees(m, image)]
    if not matches:
        return None
    if ranked == [None]:  # no pipeline chosen: the masks must come from one place
        sources = sorted({m.pipeline or "" for m in matches})
        if len(sources) > 1:
            raise InputError(
                f"{image.path}: its {kind} mask is found in "
                + ", ".join(f"derivatives/{s}" if s else "anat/" for s in sources)
                + "; choose the pipeline with --derivatives NAME"
            )
    else:
        first = next(s for s in ranked if any(m.pipeline == s for m in matches))
        matches = [m for m in matches if m.pipeline == first]
    best = max(specificity(m) for m in matches)
    matches = [m for m in matches if specificity(m) == best]
    if len(matches) > 1:
        raise InputError(
            f"{matches[0].path.parent}: {len(matches)} {kind} masks fit {image.path.name} "
            f"({', '.join(m.path.name for m in matches)}); expected one"
        )
    return matches[0]


def find_sessions(
    root: Path,
    suffix: str | None = None,
    pipelines: Sequence[str] | None = None,
    fixed: Mapping[str, str] | None = None,
) -> tuple[str, list[Session], list[str]]:
    """(suffix, the samples of the dataset at ``root``, sessions without an image).

    ``suffix`` picks the contrast (default: the one of FLAIR/T2w/T1w the dataset has);
    ``pipelines`` the derivatives that masks come from, first first, raw ``anat/`` last (default:
    every pipeline, and a mask found in two places is an error); ``fixed`` entities the image must
    have (e.g. ``{"acq": "3d"}``).
    """
    fixed = dict(fixed or {})
    raw = anat_files(root)
    suffix = _choose_suffix(root, raw, suffix)
    _check_fixed(root, [f for f in raw if f.suffix == suffix], suffix, fixed)
    available = pipelines_of(root)
    if pipelines:
        unknown = [p for p in pipelines if p not in available]
        if unknown:
            raise InputError(
                f"{root / 'derivatives' / unknown[0]}: no such pipeline; the dataset has "
                f"{', '.join(available) or 'no derivatives'}"
            )
        ranked: list[str | None] = [*pipelines, None]
    else:
        ranked = [None]
    derived = [f for p in (pipelines or available) for f in anat_files(root / "derivatives" / p, p)]
    masks = [f for f in raw + derived if mask_kind(f) is not None]

    by_sample: dict[tuple[str, str | None], list[BidsFile]] = {}
    for f in raw:
        by_sample.setdefault((f.sub, f.ses), []).append(f)
    for folder in [*root.glob("sub-*/anat"), *root.glob("sub-*/ses-*/anat")]:
        parts = [p.split("-", 1)[1] for p in folder.relative_to(root).parts[:-1]]
        by_sample.setdefault((parts[0], parts[1] if len(parts) > 1 else None), [])

    sessions, without = [], []
    for (sub, ses), files in sorted(by_sample.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
        chosen = choose_image(files, folder, suffix, fixed)
        if chosen is None:
            without.append(f"sub-{sub}" + (f"_ses-{ses}" if ses else ""))
            continue
        image, others = chosen
        own = [m for m in masks if (m.sub, m.ses) == (sub, ses)]
        sessions.append(
            Session(
                participant=f"sub-{sub}",
                session=f"ses-{ses}" if ses else None,
                image=image,
                masks={k: choose_mask(image, own, ranked, k) for k in MASK_KINDS},
                passed_over=[f.path.name for f in others],
            )
        )
    _check_masks_complete(root, sessions)
    return suffix, sessions, without


def _choose_suffix(root: Path, files: list[BidsFile], suffix: str | None) -> str:
    present = sorted({f.suffix for f in files if f.suffix not in NOT_IMAGES})
    if suffix is not None:
        if suffix in NOT_IMAGES or not re.fullmatch(_LABEL, suffix):
            raise InputError(f"suffix must name an image contrast such as FLAIR; got {suffix!r}")
        if suffix not in present:
            raise InputError(f"{root}: no {suffix} images; the dataset has {present or 'none'}")
        return suffix
    known = [s for s in IMAGE_SUFFIXES if s in present]
    if not known:
        raise InputError(
            f"{root}: no images; expected sub-*/[ses-*/]anat/sub-*_{{{','.join(IMAGE_SUFFIXES)}}}"
            ".nii.gz"
            + (
                f" (found suffixes {', '.join(present)}: choose one with --suffix)"
                if present
                else ""
            )
        )
    if len(known) > 1:
        raise InputError(
            f"{root}: several modalities ({', '.join(known)}); choose one with --suffix"
        )
    return known[0]


def _check_fixed(root: Path, images: list[BidsFile], suffix: str, fixed: Mapping[str, str]) -> None:
    """Every fixed entity is on some image: a typo must not read as "no images"."""
    for key, value in fixed.items():
        if not any(f.entities.get(key) == value for f in images):
            seen = sorted({f.entities[key] for f in images if key in f.entities})
            have = ", ".join(f"{key}-{v}" for v in seen) if seen else f"none states {key}"
            raise InputError(f"{root}: no {suffix} image has {key}-{value}; they have {have}")


def _check_masks_complete(root: Path, sessions: list[Session]) -> None:
    """Lesion masks and dsegs exist for every sample or for none (the cache keeps one array of
    each); so do brain masks from a pipeline (one that skipped a sample likely failed on it),
    while brain masks in raw ``anat/`` may be partial (the others are estimated).

    The error names the file expected for the first sample without one, built from a sample
    that has one (same place, same entities but sub, ses and the source entities)."""
    for kind in MASK_KINDS:
        have = [s for s in sessions if s.masks[kind] is not None]
        if not have or len(have) == len(sessions):
            continue
        if kind == "brain" and all(s.masks[kind].pipeline is None for s in have):
            continue
        lacking = next(s for s in sessions if s.masks[kind] is None)
        example = next(s.masks[kind] for s in have)
        base = root if example.pipeline is None else root / "derivatives" / example.pipeline
        entities = {"sub": lacking.image.sub, "ses": lacking.image.ses} | {
            k: v for k, v in example.entities.items() if k not in ("sub", "ses", *SOURCE_ENTITIES)
        }
        name = "_".join(f"{k}-{v}" for k, v in entities.items() if v) + f"_{example.suffix}.nii.gz"
        folder = base / lacking.participant / (lacking.session or "") / "anat"
        raise InputError(
            f"{folder / name}: missing; {len(have)} of {len(sessions)} samples have a {kind} "
            f"mask in {example.where}, none for {lacking.id}; expected all or none"
        )


def read_tsv(path: Path, id_column: str) -> pd.DataFrame:
    """A BIDS table as text (ids like 0001 keep their zeros), checked for ``id_column``."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: cannot read the table ({err})") from err
    if table.empty:
        raise InputError(f"{path}: the table has no rows")
    if id_column not in table.columns:
        raise InputError(f"{path}: expected a {id_column} column; found {list(table.columns)}")
    dup = sorted(set(table[id_column][table[id_column].duplicated()]))
    if dup:
        raise InputError(f"{path}: duplicate subject id(s) {', '.join(dup)}")
    return table


def session_table(root: Path, participant: str, sessions: list[str]) -> pd.DataFrame | None:
    """``sub-X/sub-X_sessions.tsv`` indexed by session_id, checked to list every session."""
    path = root / participant / f"{participant}_sessions.tsv"
    if not path.is_file():
        return None
    table = read_tsv(path, "session_id")
    unlisted = sorted(set(sessions) - set(table["session_id"]))
    if unlisted:
        raise InputError(
            f"{path}: sessions {', '.join(unlisted[:5])} have no row; expected one row per session"
        )
    return table.set_index("session_id")
