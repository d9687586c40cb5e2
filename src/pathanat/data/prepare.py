"""Cohort -> slice cache: prepare every subject, split by subject, write one file set per split.

Cache layout (this module writes it and ``load_cache`` reads it; nothing else knows it):

    CACHE/manifest.json        how the cache was made: version, parameters, source cohort, and per
                               sample its source files, original shape/zooms/orientation,
                               standardisation mean and std, kept slices, prepared-grid affine,
                               split, and (registered) the transform and its quality
    CACHE/subjects.tsv         subject (the sample), split, [participant, session,] attributes
    CACHE/transforms/{subject}_from-MNI152NLin2009aSym_to-orig_xfm.txt
                               registered caches: the 4 x 4 template-world -> subject-world matrix
    CACHE/{split}_image.npy    float32 (N, NX, NY) standardised slices; axes are RAS x, y
    CACHE/{split}_brain.npy    uint8 (N, NX, NY) brain mask
    CACHE/{split}_lesion.npy   uint8 (N, NX, NY) lesion mask, when the cohort has lesion masks
    CACHE/{split}_dseg.npy     uint8 (N, NX, NY) tissue labels, when the cohort has dsegs
    CACHE/{split}_slices.tsv   one row per slice: subject, slice (k of the prepared grid), z_mm
                               (world z of the slice centre), attributes

A sample ("subject" in the tables) is one image: a participant's session, or the participant.
Samples are split by participant, so every session of a person lies in one split.

Slice k of a subject maps to world coordinates through that subject's affine in the manifest:
(x, y, z, 1) = affine @ (i, j, k, 1); the world is the subject's own unless the cache was
registered (``--register``), when it is the template's and ``Cache.subject_affine`` maps the
slice voxels to the subject's world.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import closing
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from pathanat import __version__
from pathanat.atomic import atomic_dir
from pathanat.data import register as registration
from pathanat.data.cohort import Cohort, Subject, read_cohort
from pathanat.data.volume import (
    STANDARDISE_PERCENTILES,
    Volume,
    binary,
    brain_box,
    check_same_grid,
    estimate_brain_mask,
    labels,
    load_volume,
    resample,
    skull_suspected,
    slice_grid,
    standardisation,
)
from pathanat.defaults import (
    DEFAULT_SLICES,
    IN_PLANE_MM,
    REGISTER,
    SEED,
    SHAPE,
    SLICE_MM,
    WORKERS,
)
from pathanat.errors import ConfigError, InputError
from pathanat.jsonfiles import read_json, write_json

CACHE_FORMAT = 1
REPREPARE = "prepare the cache again (`pathanat prepare ... --overwrite`)"
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
SHAPE_MULTIPLE = 16  # 2^L for L = 4 downsamplings of the hierarchical VAE


@dataclass(frozen=True)
class Settings:
    in_plane_mm: float
    slice_mm: float
    n_slices: int
    shape: tuple[int, int]
    register: str = REGISTER


@dataclass
class PreparedSubject:
    """One subject on the prepared grid, arrays (n_slices, NX, NY), and its manifest record."""

    id: str
    image: np.ndarray
    brain: np.ndarray
    lesion: np.ndarray | None
    dseg: np.ndarray | None
    record: dict


def prepare_subject(subject: Subject, settings: Settings) -> PreparedSubject:
    """Load, check, resample and standardise one subject's image and masks."""
    image = load_volume(subject.image, "image")
    masks = subject_masks(subject, image)
    estimated = "brain" not in masks
    brain = estimate_brain_mask(image.data) if estimated else masks["brain"]
    if not brain.any():
        where = subject.image if estimated else subject.brain_mask
        raise InputError(f"{where}: the brain mask is empty; expected a brain")
    skull = None
    if estimated:
        skull = skull_suspected(brain, np.linalg.norm(image.affine[:3, :3], axis=0))

    # The world the grid is defined in: the subject's own, or the template's once registered.
    source_affine, aligned = image.affine, None
    if settings.register != "none":
        aligned = registration.register(image.data, image.affine, brain, settings.register)
        source_affine = np.linalg.solve(aligned.matrix, image.affine)
    lo, hi = brain_box(brain, source_affine)
    # Registered grids share the template's centre, so slice k is one brain level in everyone.
    centre = (lo + hi) / 2 if aligned is None else registration.brain_centre()
    grid = slice_grid(
        centre, settings.in_plane_mm, settings.slice_mm, settings.shape, settings.n_slices
    )
    grid_shape = (*settings.shape, settings.n_slices)

    def on_grid(data: np.ndarray, order: int) -> np.ndarray:
        out = resample(data, source_affine, grid, grid_shape, order)
        return np.ascontiguousarray(np.moveaxis(out, 2, 0))  # slices first: (n, NX, NY)

    values = on_grid(image.data, order=1)
    brain_slices = on_grid(brain, order=0)
    try:
        mean, std = standardisation(values, brain_slices)
    except ValueError as err:
        raise InputError(f"{subject.image}: cannot standardise ({err})") from err
    z_mm = grid[2, 3] + grid[2, 2] * np.arange(settings.n_slices)
    record = {
        **_provenance(subject, image, estimated, skull),
        "mean": mean,
        "std": std,
        # The kept slices lie inside [min z, max z] of this box unless the brain is too short.
        "brain_box_mm": {"min": lo.round(3).tolist(), "max": hi.round(3).tolist()},
        "kept_z_mm": [float(z_mm[0]), float(z_mm[-1])],
        "affine": grid.tolist(),
    }
    if aligned is not None:
        record["registration"] = aligned.record()
    return PreparedSubject(
        id=subject.id,
        image=((values - mean) / std).astype(np.float32),
        brain=brain_slices,
        lesion=on_grid(masks["lesion"], order=0) if "lesion" in masks else None,
        dseg=on_grid(masks["dseg"], order=0) if "dseg" in masks else None,
        record=record,
    )


def subject_masks(subject: Subject, image: Volume) -> dict[str, np.ndarray]:
    """The subject's given masks (lesion, brain, dseg), each checked to share the image's grid."""
    masks = {}
    for name, path, what in (
        ("lesion", subject.mask, "lesion mask"),
        ("brain", subject.brain_mask, "brain mask"),
        ("dseg", subject.dseg, "dseg"),
    ):
        if path is not None:
            volume = load_volume(path, what)
            check_same_grid(image, volume, what)
            masks[name] = labels(volume) if name == "dseg" else binary(volume)
    return masks


def _provenance(subject: Subject, image: Volume, estimated: bool, skull: object) -> dict:
    """Where a subject's record came from: its files, its entities and its original grid."""
    return {
        "sources": {
            "image": str(subject.image),
            "mask": _str(subject.mask),
            "brain_mask": _str(subject.brain_mask),
            "dseg": _str(subject.dseg),
        },
        "mask_sources": subject.sources,
        "brain_mask_estimated": estimated,
        "skull_suspected": skull,
        "participant": subject.participant,
        "session": subject.session,
        "entities": subject.entities,
        "original": {
            "shape": list(image.shape),
            "zooms": list(image.zooms),
            "orientation": image.orientation,
        },
    }


def split_subjects(ids: Sequence[str], seed: int) -> dict[str, str]:
    """Subject -> split, 60/20/20 by subject, the same for the same ids and seed."""
    n = len(ids)
    if n < len(SPLITS):
        raise ValueError(f"{n} subject(s); a train/val/test split needs at least {len(SPLITS)}")
    n_val = max(1, round(SPLIT_FRACTIONS[1] * n))
    n_test = max(1, round(SPLIT_FRACTIONS[2] * n))
    order = np.random.default_rng(seed).permutation(sorted(ids))
    sizes = {"train": n - n_val - n_test, "val": n_val, "test": n_test}
    out, start = {}, 0
    for split in SPLITS:
        for sid in order[start : start + sizes[split]]:
            out[str(sid)] = split
        start += sizes[split]
    return out


class PrepareWarning(UserWarning):
    """Something in a prepared cohort a user should look at; the cache is written regardless."""


def prepare_cohort(
    cohort: Path,
    out: Path,
    in_plane_mm: float = IN_PLANE_MM,
    slice_mm: float = SLICE_MM,
    n_slices: int | None = None,
    shape: tuple[int, int] = SHAPE,
    seed: int = SEED,
    overwrite: bool = False,
    progress: bool = True,
    modality: str | None = None,
    workers: int = WORKERS,
    derivatives: Sequence[str] | None = None,
    entities: dict[str, str] | None = None,
    register: str = REGISTER,
) -> Path:
    """Prepare a cohort (BIDS folder or CSV manifest) into a slice cache at ``out``.

    ``n_slices`` defaults to 24 for FLAIR/T2w and 16 for T1w (else 24 with lesion masks, 16
    without); ``modality`` is the image suffix to use when a BIDS cohort has several;
    ``derivatives`` the pipelines masks come from and ``entities`` entities the image must have
    (pathanat.data.bids); ``register`` (none, rigid, affine) aligns each head to the MNI152
    template first (pathanat.data.register); ``workers`` processes prepare samples in parallel.
    Samples are split 60/20/20 by participant. Nothing is left at ``out`` unless the whole cache
    was written. Estimated brain masks that look like they hold the skull, and registrations
    whose quality is an outlier, are warned of (PrepareWarning) and recorded in the manifest.
    """
    _check_settings(in_plane_mm, slice_mm, n_slices, shape, workers)
    if register not in registration.MODES:
        raise ConfigError(f"register must be one of {', '.join(registration.MODES)}; "
                          f"got {register!r}")
    source = read_cohort(cohort, modality, derivatives, entities)
    n_slices = default_slices(source) if n_slices is None else n_slices
    settings = Settings(float(in_plane_mm), float(slice_mm), int(n_slices),
                        tuple(map(int, shape)), register)
    members = split_members(source, seed)

    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        arrays = _open_arrays(tmp, source, members, settings)
        slot = {s.id: (k, i * n_slices) for k in SPLITS for i, s in enumerate(members[k])}
        records = {}
        # closing() stops the worker pool as soon as anything here fails, not at garbage collection.
        with closing(_prepared(source.subjects, settings, workers)) as prepared:
            for done in tqdm(prepared, total=len(source.subjects), desc="prepare",
                             unit="sample", disable=not progress):
                split, start = slot[done.id]
                for name, array in arrays[split].items():
                    array[start : start + n_slices] = getattr(done, name)
                records[done.id] = {"split": split, **done.record}
        for split_arrays in arrays.values():
            for array in split_arrays.values():
                array.flush()
        del arrays  # close the memory maps before the folder is renamed
        flag_registration_outliers(records)
        _write_tables(tmp, source, members, records, settings)
        _write_transforms(tmp, records)
        _write_manifest(tmp, source, members, records, settings, seed)
    _warn(source, records)
    return out


def default_slices(source: Cohort) -> int:
    """Slices per sample by contrast (``DEFAULT_SLICES``), else 24 with lesion masks, 16 without."""
    return DEFAULT_SLICES.get(source.modality or "", 24 if source.has_lesion else 16)


def split_members(source: Cohort, seed: int) -> dict[str, list[Subject]]:
    """Each split's samples, the split drawn by participant: two sessions of one person in train
    and test would leak their anatomy."""
    participants = sorted({s.participant for s in source.subjects})
    if len(participants) < len(SPLITS):
        raise InputError(
            f"{source.source}: {len(participants)} subject(s); a train/val/test split needs at "
            f"least {len(SPLITS)} (one per split)"
        )
    split_of_participant = split_subjects(participants, seed)
    return {k: [s for s in source.subjects if split_of_participant[s.participant] == k]
            for k in SPLITS}


def flag_registration_outliers(records: dict[str, dict]) -> list[str]:
    """Mark (``registration.outlier``) and return the samples whose registration looks wrong:
    brain-mask Dice with the template below MIN_DICE, or (5+ samples) more than 3 robust standard
    deviations (1.4826 x MAD, at least 0.005) below the cohort's median Dice; or an affine fit of
    a head that shows less than MIN_COVERAGE of the template's brain (e.g. a slab), whose scale
    along the missing extent is unconstrained."""
    dice = {sid: r["registration"]["dice"] for sid, r in records.items() if "registration" in r}
    if not dice:
        return []
    values = np.array(list(dice.values()))
    floor = registration.MIN_DICE
    if len(values) >= 5:
        mad = 1.4826 * np.median(np.abs(values - np.median(values)))
        floor = max(floor, float(np.median(values) - 3 * max(mad, 0.005)))
    flagged = []
    for sid, d in sorted(dice.items()):
        reg = records[sid]["registration"]
        partial = reg["mode"] == "affine" and reg.get("coverage", 1.0) < registration.MIN_COVERAGE
        reg["outlier"] = bool(d < floor or partial)
        if reg["outlier"]:
            flagged.append(sid)
    return flagged


def _warn(source: Cohort, records: dict[str, dict]) -> None:
    """One line per kind of problem, naming the samples (and the manifest records them)."""
    skull = sorted(sid for sid, r in records.items() if r.get("skull_suspected"))
    if skull:
        first = records[skull[0]]
        warnings.warn(PrepareWarning(
            f"{first['sources']['image']}: the estimated brain mask looks like it includes the "
            f"skull ({first['skull_suspected']}); {len(skull)} sample(s) so "
            f"({', '.join(skull[:5])}): give brain masks (a desc-brain_mask derivative or a "
            "brain_mask column)"
        ), stacklevel=2)
    outliers = sorted(sid for sid, r in records.items()
                      if r.get("registration", {}).get("outlier"))
    if outliers:
        shown = ", ".join(
            f"{sid} (Dice {records[sid]['registration']['dice']:.2f}, "
            f"{records[sid]['registration']['coverage']:.0%} of the brain in view)"
            for sid in outliers[:5]
        )
        warnings.warn(PrepareWarning(
            f"{source.source}: registration to the template looks wrong for {len(outliers)} "
            f"sample(s): {shown}; check their images and brain masks (an affine fit needs the "
            "whole brain in view: use --register rigid for slabs)"
        ), stacklevel=2)


def _check_settings(
    in_plane_mm: float, slice_mm: float, n_slices: int | None, shape: Sequence[int], workers: int
) -> None:
    for name, value in (("in_plane_mm", in_plane_mm), ("slice_mm", slice_mm)):
        if not (isinstance(value, Real) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number of mm; got {value!r}")
    if n_slices is not None and not (isinstance(n_slices, Integral) and n_slices >= 1):
        raise ConfigError(f"n_slices must be a positive integer; got {n_slices!r}")
    if len(shape) != 2 or any(
        not isinstance(n, Integral) or n <= 0 or n % SHAPE_MULTIPLE for n in shape
    ):
        raise ConfigError(
            f"shape must be two positive multiples of {SHAPE_MULTIPLE}; got {tuple(shape)}"
        )
    if not (isinstance(workers, Integral) and workers >= 1):
        raise ConfigError(f"workers must be a positive integer; got {workers!r}")


def _prepared(
    subjects: list[Subject], settings: Settings, workers: int
) -> Iterator[PreparedSubject]:
    """Prepared subjects as they finish; the first failure cancels the rest and is raised."""
    if workers == 1 or len(subjects) == 1:
        for subject in subjects:
            yield prepare_subject(subject, settings)
        return
    # Not fork: the caller may hold threads (torch, a progress bar) whose locks a fork would copy.
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(min(workers, len(subjects)), mp_context=mp.get_context(method))
    try:
        futures = [pool.submit(prepare_subject, s, settings) for s in subjects]
        for future in as_completed(futures):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _open_arrays(
    folder: Path, source: Cohort, members: dict[str, list[Subject]], settings: Settings
) -> dict[str, dict[str, np.ndarray]]:
    kinds = {"image": np.float32, "brain": np.uint8}
    if source.has_lesion:
        kinds["lesion"] = np.uint8
    if source.has_dseg:
        kinds["dseg"] = np.uint8
    return {
        split: {
            name: open_memmap(
                folder / f"{split}_{name}.npy", mode="w+", dtype=dtype,
                shape=(len(members[split]) * settings.n_slices, *settings.shape),
            )
            for name, dtype in kinds.items()
        }
        for split in SPLITS
    }


def _write_tables(
    folder: Path,
    source: Cohort,
    members: dict[str, list[Subject]],
    records: dict[str, dict],
    settings: Settings,
) -> None:
    # With sessions, the tables say whose session each sample is (the split follows the person).
    who = ["participant", "session"] if source.has_sessions else []

    def identity(s: Subject) -> dict:
        return {"participant": s.participant, "session": s.session} if who else {}

    rows = [{"subject": s.id, "split": k, **identity(s), **s.attributes}
            for k in SPLITS for s in members[k]]
    _to_tsv(pd.DataFrame(rows, columns=["subject", "split", *who, *source.attributes]),
            folder / "subjects.tsv")
    for split in SPLITS:
        rows = []
        for s in members[split]:
            z0, z1 = records[s.id]["kept_z_mm"]
            for k, z in enumerate(np.linspace(z0, z1, settings.n_slices)):
                rows.append({"subject": s.id, "slice": k, "z_mm": round(float(z), 4),
                             **identity(s), **s.attributes})
        columns = ["subject", "slice", "z_mm", *who, *source.attributes]
        _to_tsv(pd.DataFrame(rows, columns=columns), folder / f"{split}_slices.tsv")


def transform_name(subject: str) -> str:
    return f"{subject}_from-{registration.TEMPLATE_NAME}_to-orig_xfm.txt"


def _write_transforms(folder: Path, records: dict[str, dict]) -> None:
    """Per registered sample, its template -> subject matrix as text (numpy.loadtxt reads it)."""
    registered = {sid: r["registration"] for sid, r in records.items() if "registration" in r}
    if not registered:
        return
    (folder / "transforms").mkdir()
    for sid, reg in registered.items():
        np.savetxt(
            folder / "transforms" / transform_name(sid), np.array(reg["template_to_subject"]),
            fmt="%.6f",
            header=f"{reg['mode']} transform of {sid}: maps {reg['template']} world (mm, RAS) to "
                   "the subject's world (mm, RAS) of its source image",
        )


def _to_tsv(table: pd.DataFrame, path: Path) -> None:
    table.to_csv(path, sep="\t", index=False, na_rep="n/a")


def _write_manifest(
    folder: Path,
    source: Cohort,
    members: dict[str, list[Subject]],
    records: dict[str, dict],
    settings: Settings,
    seed: int,
) -> None:
    manifest = {
        "format": CACHE_FORMAT,
        "pathanat_version": __version__,
        "parameters": {
            "in_plane_mm": settings.in_plane_mm,
            "slice_mm": settings.slice_mm,
            "n_slices": settings.n_slices,
            "shape": list(settings.shape),
            "seed": seed,
            "split_fractions": dict(zip(SPLITS, SPLIT_FRACTIONS, strict=True)),
            "standardisation": "per sample, zero mean and unit variance over the brain-mask "
                               "voxels of the kept slices between their "
                               f"{STANDARDISE_PERCENTILES[0]:g}th and "
                               f"{STANDARDISE_PERCENTILES[1]:g}th percentiles (values are not "
                               "clipped); original = value * std + mean",
            "register": settings.register,
            "split_unit": "participant: every session of a person is in one split",
            "interpolation": "image: linear after Gaussian anti-aliasing where downsampling; "
                             "masks and dseg: nearest neighbour",
        },
        "source": {
            "path": str(Path(source.source).resolve()),
            "layout": source.layout,
            "modality": source.modality,
            "sessions": source.has_sessions,
            "runs_passed_over": source.passed_over,
            "sessions_without_image": source.without_image,
        },
        "arrays": ["image", "brain"] + ["lesion"] * source.has_lesion + ["dseg"] * source.has_dseg,
        "attributes": source.attributes,
        "numeric_attributes": _numeric(source),
        "splits": {split: [s.id for s in members[split]] for split in SPLITS},
        "participants": {
            split: sorted({s.participant for s in members[split]}) for split in SPLITS
        },
        "subjects": {sid: records[sid] for sid in sorted(records)},
    }
    write_json(folder / "manifest.json", manifest)


def _numeric(source: Cohort) -> list[str]:
    """Attribute columns whose every given value is a number."""
    def is_number(v: object) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    return [
        a for a in source.attributes
        if all(is_number(s.attributes[a]) or s.attributes[a] is None for s in source.subjects)
        and any(s.attributes[a] is not None for s in source.subjects)
    ]


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


# -- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSplit:
    """One split's slices: arrays (N, NX, NY), memory-mapped, and a table row per slice."""

    name: str
    image: np.ndarray
    brain: np.ndarray
    lesion: np.ndarray | None
    dseg: np.ndarray | None
    slices: pd.DataFrame

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def participants(self) -> np.ndarray:
        """Each slice's participant: the unit a bootstrap resamples, since a person's sessions
        are correlated (the subject, i.e. the sample, in a cache without sessions)."""
        column = "participant" if "participant" in self.slices else "subject"
        return self.slices[column].to_numpy()


@dataclass(frozen=True)
class Cache:
    """A prepared slice cache: its manifest, subject table, and access to each split."""

    path: Path
    manifest: dict
    subjects: pd.DataFrame

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.manifest["parameters"]["shape"])

    @property
    def n_slices(self) -> int:
        return self.manifest["parameters"]["n_slices"]

    @property
    def has_lesion(self) -> bool:
        return "lesion" in self.manifest["arrays"]

    @property
    def has_dseg(self) -> bool:
        return "dseg" in self.manifest["arrays"]

    @property
    def attributes(self) -> list[str]:
        return list(self.manifest["attributes"])

    @property
    def numeric_attributes(self) -> list[str]:
        return list(self.manifest["numeric_attributes"])

    def split(self, name: str, mmap: bool = True) -> CacheSplit:
        """The slices of ``name`` (train, val or test), memory-mapped read-only by default."""
        if name not in SPLITS:
            raise InputError(f"{self.path}: unknown split {name!r}; expected one of {SPLITS}")
        arrays = {
            kind: _cache_array(self.path / f"{name}_{kind}.npy", mmap)
            if kind in self.manifest["arrays"] else None
            for kind in ("image", "brain", "lesion", "dseg")
        }
        slices = _cache_table(self.path / f"{name}_slices.tsv", ("subject", "slice"))
        lengths = {k: len(a) for k, a in arrays.items() if a is not None}
        if any(n != len(slices) for n in lengths.values()):
            raise InputError(
                f"{self.path}: the {name} split's arrays hold {lengths} slices and "
                f"{name}_slices.tsv {len(slices)} rows; {REPREPARE}"
            )
        return CacheSplit(name=name, slices=slices, **arrays)

    def stats(self, subject: str) -> tuple[float, float]:
        """The (mean, std) that standardised ``subject``'s image."""
        record = self._record(subject)
        return record["mean"], record["std"]

    def affine(self, subject: str) -> np.ndarray:
        """Voxel (i, j, slice) -> world (mm, RAS) affine of ``subject``'s prepared slices."""
        return np.array(self._record(subject)["affine"])

    def transform(self, subject: str) -> np.ndarray | None:
        """Template world -> subject world (4 x 4) of a registered ``subject``; else None."""
        reg = self._record(subject).get("registration")
        return None if reg is None else np.array(reg["template_to_subject"])

    def subject_affine(self, subject: str) -> np.ndarray:
        """Voxel (i, j, slice) -> the subject's own world (mm, RAS), registered or not."""
        moved = self.transform(subject)
        return self.affine(subject) if moved is None else moved @ self.affine(subject)

    def to_original(self, values: np.ndarray, subjects: str | Sequence[str]) -> np.ndarray:
        """Standardised values back on the original intensity scale.

        ``subjects`` is one id for all of ``values``, or one id per entry of its first axis.
        """
        values = np.asarray(values, dtype=np.float64)
        if isinstance(subjects, str):
            mean, std = self.stats(subjects)
        else:
            stats = np.array([self.stats(s) for s in subjects])
            if len(stats) != len(values):
                raise ValueError(f"{len(stats)} subjects for {len(values)} values")
            mean, std = (stats[:, i].reshape(-1, *[1] * (values.ndim - 1)) for i in (0, 1))
        return values * std + mean

    def _record(self, subject: str) -> dict:
        try:
            return self.manifest["subjects"][subject]
        except KeyError:
            raise InputError(f"{self.path}: no subject {subject!r} in the cache") from None


def load_cache(path: str | Path) -> Cache:
    """Open the slice cache written by ``prepare_cohort`` at ``path``."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{path}: no manifest.json; expected a cache made by `pathanat prepare`")
    manifest = read_json(manifest_path, REPREPARE)
    if manifest.get("format") != CACHE_FORMAT:
        raise InputError(
            f"{manifest_path}: cache format {manifest.get('format')!r}; expected {CACHE_FORMAT}"
        )
    return Cache(path=path, manifest=manifest,
                 subjects=_cache_table(path / "subjects.tsv", ("subject", "split")))


def _cache_array(path: Path, mmap: bool) -> np.ndarray:
    """A cache array, memory-mapped read-only when ``mmap``; damage named with its file."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        reason = str(err).splitlines()[0][:120]
        raise InputError(f"{path}: cannot read this cache array ({reason}); {REPREPARE}") from None


def _cache_table(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """A cache TSV with at least ``columns``; damage named with its file."""
    try:
        table = pd.read_csv(path, sep="\t", dtype={"subject": str}, na_values=["n/a"],
                            keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as err:  # ValueError: bad UTF-8 too
        reason = str(err).splitlines()[0][:120]
        raise InputError(f"{path}: cannot read this cache table ({reason}); {REPREPARE}") from None
    lacking = [c for c in columns if c not in table.columns]
    if lacking:
        raise InputError(f"{path}: no column {', '.join(lacking)}; {REPREPARE}")
    return table
