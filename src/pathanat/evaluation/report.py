"""`pathanat report`: one self-contained HTML page that compares trained runs.

It reads what the other commands wrote into each run folder and shows it side by side:

    config.yaml, summary.json, metrics.csv   `pathanat train`     overview, training curves
    metrics.json                             `pathanat evaluate`  Table 1 (NLL, PSNR, SSIM, FID)
    analysis.json                            `pathanat analyze`   Table 4 R^2 grid, sensitivity, DCI
    validity.json                            `pathanat validity`  invalid-lesion rates of samples
    counterfactual.json                      `pathanat counterfactual`  swap, lesion detection
    synthesis.json, figures/*.png (+ .txt)   `pathanat synthesize` and the rest: every figure

Nothing is recomputed except the training-curve plots. What a run lacks is shown as "not
computed -- run `pathanat ... RUN`", never left out, so a reader can tell a missing result from
a bad one. Images are embedded as base64 data URIs, the style sheet is inline and there is no
script, so the one file can be mailed or archived and opens offline.

The page's markup lives in Jinja2 templates shipped with the package, in
``pathanat/evaluation/templates/``: ``report.html.j2`` (the page and its sections),
``macros.html.j2`` (a table, a cell, a figure) and ``report.css``. This module computes only the
data they draw -- sections of plain dicts and lists, every value text -- and the templates escape
every value, so a string taken from a file can never become markup.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import functools
import io
import math
import os
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import yaml
from matplotlib import colormaps
from matplotlib.colors import to_hex

from pathanat import jsonfiles
from pathanat.atomic import atomic_file
from pathanat.config import from_dict
from pathanat.errors import InputError, PathanatError
from pathanat.evaluation.claims import verdict_text
from pathanat.figures import caption_path
from pathanat.models import VAMPPRIOR_KINDS, HierarchicalVAE, HVAEConfig

REPORT_HTML = "report.html"
PAGE_TEMPLATE = "report.html.j2"  # in evaluation/templates/
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Captions for figures that other commands write without a caption file.
BUILTIN_CAPTIONS = {
    "val_reconstructions": "Training: the first validation slices (top row) above their "
    "reconstructions (bottom row) at the latest validation step.",
    "latent_r2": "Lasso test R² of each latent group's posterior-mean codes against every cohort "
    "attribute, at slice and subject level (colours clipped to [-1, 1]).",
    "pathology_sensitivity": "Pathology sensitivity: one test slice decoded with a single latent "
    "group scaled by each factor (columns), one group per row, pathology region outlined in red; "
    "the ratio is the mean change inside the region over the change outside it.",
}

# The figures a complete run folder holds, in the order the report shows them, with the command
# that writes each. Figures not listed here are shown after these, by name.
TRAIN, ANALYZE, VALIDITY = "train --resume", "analyze", "validity"
EXPECTED_FIGURES = (
    ("val_reconstructions", TRAIN, ""),
    ("latent_r2", ANALYZE, ""),
    ("pathology_sensitivity", ANALYZE, ""),
    ("sample_validity", VALIDITY, ""),
    ("synth_prior", "synthesize", "--what prior"),
    ("synth_layers", "synthesize", "--what layers"),
    ("synth_style_mix", "synthesize", "--what style-mix"),
    ("synth_conditional", "synthesize", "--what conditional"),
    ("synth_clusters", "synthesize", "--what clusters"),
)

# Table 1: (header, keys into metrics.json, decimals, which way is better).
TABLE1 = (
    ("NLL (nats/slice)", ("nll", "nats_per_slice"), 1, "min"),
    ("NLL (bits/dim)", ("nll", "bits_per_dim"), 4, "min"),
    ("NLL move S to 4S (nats)", ("nll", "convergence", "move"), 1, "none"),
    ("bits/pixel brain", ("nll", "regions", "brain"), 3, "min"),
    ("bits/pixel background", ("nll", "regions", "background"), 3, "min"),
    ("continuous NLL (bits/dim)", ("nll", "continuous", "bits_per_dim"), 4, "none"),
    ("PSNR (dB)", ("reconstruction", "psnr"), 2, "max"),
    ("SSIM", ("reconstruction", "ssim"), 4, "max"),
    ("PSNR brain (dB)", ("reconstruction", "psnr_brain"), 2, "max"),
    ("SSIM brain", ("reconstruction", "ssim_brain"), 4, "max"),
    ("FID recon.", ("fid", "fid_reconstruction"), 3, "min"),
    ("FID samples", ("fid", "fid_samples"), 3, "min"),
    ("KID recon.", ("fid", "kid_reconstruction"), 4, "min"),
    ("KID samples", ("fid", "kid_samples"), 4, "min"),
    ("FID 2nd-stage samples", ("fid", "fid_samples_second_stage"), 3, "min"),
    ("KID 2nd-stage samples", ("fid", "kid_samples_second_stage"), 4, "min"),
    ("2nd-stage detail steps", ("fid", "second_stage_detail_steps"), 0, "none"),
    ("brain-like T=0.6", ("plausibility", "samples", "0.6", "brain_like"), 3, "max"),
    ("brain-like T=0.8", ("plausibility", "samples", "0.8", "brain_like"), 3, "max"),
    ("brain-like T=1", ("plausibility", "samples", "1.0", "brain_like"), 3, "max"),
    ("brain-like real", ("plausibility", "real", "brain_like"), 3, "max"),
    ("shape diversity T=1", ("plausibility", "samples", "1.0", "shape_diversity"), 3, "none"),
    ("shape diversity real", ("plausibility", "real", "shape_diversity"), 3, "none"),
    ("brain-like 2nd stage", ("plausibility", "second_stage", "brain_like"), 3, "max"),
    ("shape diversity 2nd stage", ("plausibility", "second_stage", "shape_diversity"), 3,
     "none"),
    ("copy ratio samples", ("novelty", "samples", "distance_ratio"), 2, "none"),
    ("copy ratio 2nd stage", ("novelty", "second_stage", "distance_ratio"), 2, "none"),
    ("near copies 2nd stage", ("novelty", "second_stage", "near_copies"), 3, "none"),
)
DCI_COLUMNS = (
    ("D (groups)", "disentanglement_groups"),
    ("C (groups)", "completeness_groups"),
    ("D (codes)", "disentanglement_codes"),
    ("C (codes)", "completeness_codes"),
    ("I: mean test R²", "informativeness_r2_mean"),
)
# Training curves, one plot each: (metrics.csv column or group prefix, title, y label).
CURVES = (
    ("train/loss", "Training loss", "loss per dimension"),
    ("train/nll_per_dim", "Training reconstruction NLL", "nats per dimension"),
    ("train/kl_per_dim", "Training KL", "nats per dimension"),
    ("train/kl_weight", "KL weight (annealing)", "weight"),
    ("train/kl_extra", "NVMP+ extra KL", "nats per slice"),
    ("train/supervision", "Supervision loss (BCE + soft Dice)", "loss"),
    ("train/grad_norm", "Gradient norm (before clipping)", "norm"),
    ("val/elbo_per_dim", "Validation ELBO", "nats per dimension"),
    ("val/psnr", "Validation PSNR", "dB"),
    ("val/psnr_brain", "Validation PSNR inside the brain", "dB"),
    ("kl/group_", "KL per latent group", "nats per slice"),
    ("active_units/group_", "Active units per latent group", "fraction"),
)


# ---- reading run folders ------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What one run folder holds; ``None`` where a file is absent."""

    path: Path  # as the user gave it: commands in the report repeat it
    name: str
    config: dict | None
    summary: dict | None
    metrics: dict | None
    analysis: dict | None
    validity: dict | None
    counterfactual: dict | None
    synthesis: dict | None
    curves: pd.DataFrame | None
    parameters: int | None

    def model(self, key: str, default: Any = None) -> Any:
        return ((self.config or {}).get("model") or {}).get(key, default)

    def command(self, verb: str, extra: str = "") -> str:
        return " ".join(filter(None, ["pathanat", verb, shlex.quote(str(self.path)), extra]))


def read_json(path: Path) -> dict | None:
    return jsonfiles.read_json(path) if path.is_file() else None


def with_binned_nll(metrics: dict | None) -> dict | None:
    """An evaluation from before the binned NLL held the continuous one under ``nll``: show it as
    the continuous column, and the binned columns as missing (re-run evaluate for them)."""
    nll = (metrics or {}).get("nll")
    if not isinstance(nll, dict) or "bins" in nll:
        return metrics
    moved = ("nats_per_slice", "bits_per_dim")
    kept = {k: v for k, v in nll.items() if k not in moved}
    return {**metrics, "nll": {**kept, "continuous": {k: nll[k] for k in moved if k in nll}}}


def read_config(path: Path) -> dict:
    if not path.is_file():
        raise PathanatError(f"{path.parent}: not a run folder (no config.yaml)")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a mapping, got {type(content).__name__}")
    return content


def read_curves(path: Path) -> pd.DataFrame | None:
    """metrics.csv as logged: sparse columns, and a step may appear twice after a resume
    (``curve_series`` keeps the later row)."""
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: not a readable CSV ({err})") from None
    if "step" not in table.columns:
        raise InputError(f"{path}: expected a 'step' column, got {', '.join(table.columns)}")
    return table


def parameter_count(config: dict) -> int | None:
    """Trainable parameters of the model the config describes (built on the meta device: no
    memory, no checkpoint read); None when the config does not describe a model we can build."""
    try:
        model_config = from_dict(HVAEConfig, config.get("model"), "model")
        with torch.device("meta"):
            model = HierarchicalVAE(model_config)
    except PathanatError:
        return None
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def read_run(path: str | os.PathLike, name: str) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise PathanatError(f"{path}: not a run folder (no such folder)")
    config = read_config(path / "config.yaml")
    return Run(
        path=path,
        name=name,
        config=config,
        summary=read_json(path / "summary.json"),
        metrics=with_binned_nll(read_json(path / "metrics.json")),
        analysis=read_json(path / "analysis.json"),
        validity=read_json(path / "validity.json"),
        counterfactual=read_json(path / "counterfactual.json"),
        synthesis=read_json(path / "synthesis.json"),
        curves=read_curves(path / "metrics.csv"),
        parameters=parameter_count(config),
    )


def run_names(paths: Sequence[Path]) -> list[str]:
    """Folder names, lengthened by parent folders until they are distinct."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise PathanatError(f"runs: the same folder is given twice ({', '.join(map(str, paths))})")


# ---- the page's data ----------------------------------------------------------------------------
# The templates draw these plain dicts and escape every string in them. What is markup is named
# by a key, never written into a string: a cell's ``detail`` (a line below its text) and
# ``missing`` note, a latent group's subscript ({"latent": "P"}) in a header or caption.

Text = str | Sequence[str | dict[str, str]]  # plain, or pieces of text and ``latent`` names
Cell = dict[str, Any]  # text, value, classes, style, colspan, detail, missing
Block = dict[str, Any]  # kind: table, note, status, figure or figures; its content
Section = dict[str, Any]  # title, blocks, parts (sub-sections: title and blocks)


def latent(index: str) -> dict[str, str]:
    """The latent group z with subscript ``index``, a piece of a header or caption."""
    return {"latent": index}


Z_P = latent("P")


def missing(command: str) -> dict[str, str | None]:
    """What stands for a result not computed: the command that computes it."""
    return {"command": command, "text": None}


def absent(what: str) -> dict[str, str | None]:
    """What stands for a result that no command brings back, or that a file lacks."""
    return {"command": None, "text": what}


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def number(value: Any, decimals: int) -> str:
    if value is None:
        return "n/a"
    if not finite(value):
        return str(value)
    return f"{value:.{decimals}f}"


def interval(low: Any, high: Any, decimals: int) -> str:
    return f"[{number(low, decimals)}, {number(high, decimals)}]"


def cell(text: Any = "", value: Any = None, classes: Sequence[str] = (), style: str = "",
         colspan: int = 1, detail: str | None = None, missing: dict | None = None) -> Cell:
    """A table cell: ``text`` with a ``detail`` line below it (an interval, each seed's value),
    or the ``missing`` note; a finite ``value`` is kept exactly in data-value (the text is
    rounded)."""
    exact = (value if isinstance(value, int) else float(value)) if finite(value) else None
    return {"text": str(text), "value": exact, "classes": list(classes), "style": style,
            "colspan": colspan, "detail": detail, "missing": missing}


def name_cell(run: Run) -> Cell:
    return cell(run.name, classes=["name"])


def table(header: Sequence[Text], rows: Sequence[Sequence[Cell]], caption: Text = "") -> Block:
    return {"kind": "table", "header": list(header), "rows": [list(r) for r in rows],
            "caption": caption}


def note(text: str) -> Block:
    return {"kind": "note", "text": text}


def status(label: str | None, why: dict) -> Block:
    """A line saying that ``label`` (a run's curves, a figure) is missing, and ``why``."""
    return {"kind": "status", "label": label, "missing": why}


def section(title: str, blocks: Sequence[Block], parts: Sequence[Section] = ()) -> Section:
    return {"title": title, "blocks": list(blocks), "parts": list(parts)}


def figure(content: bytes, caption: str, alt: str, layout: str = "", file: str = "") -> Block:
    """A PNG embedded as a data URI; ``layout`` ("curve", "panels") sets its width, ``file``
    names it before its caption."""
    return {"kind": "figure", "src": png_data_uri(content), "alt": alt, "caption": caption,
            "layout": layout, "file": file}


def best_rows(values: Sequence[Any], better: str) -> set[int]:
    """Rows holding the best finite value of a column; none when fewer than two are finite or
    the column has no better direction (``better="none"``)."""
    present = [(i, v) for i, v in enumerate(values) if finite(v)]
    if len(present) < 2 or better == "none":
        return set()
    target = (min if better == "min" else max)(v for _, v in present)
    return {i for i, v in present if v == target}


def colour(value: Any, low: float, high: float, cmap: str = "Greens") -> str:
    """Cell background for ``value`` on [low, high] (clipped) and a readable text colour."""
    if not finite(value) or high <= low:
        return ""
    t = min(max((value - low) / (high - low), 0.0), 1.0)
    rgba = colormaps[cmap](0.05 + 0.8 * t)
    luminance = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
    return f"background:{to_hex(rgba)};color:{'#000' if luminance > 0.5 else '#fff'}"


def dig(content: dict | None, keys: Sequence[str]) -> tuple[bool, Any]:
    """(present, value) of a nested key; a key whose value is null is present."""
    for key in keys:
        if not isinstance(content, dict) or key not in content:
            return False, None
        content = content[key]
    return True, content


def group_order(names: Any) -> list[str]:
    """Group names 'z0', 'z1', ... in hierarchy order (other names after, as given)."""
    def key(name: str) -> tuple[int, str]:
        found = re.fullmatch(r"z(\d+)", name)
        return (int(found.group(1)) if found else 10**6, name)

    return sorted(dict.fromkeys(names), key=key)


def png_data_uri(content: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(content).decode("ascii")


# ---- sections -----------------------------------------------------------------------------------

OVERVIEW_CAPTION = (
    "Model kind (Table 3 of the paper), whether a lesion-segmentation head supervises ", Z_P,
    ", the prior of ", latent("0"), " (N(0, I) as in the paper, fitted N(m, s²) where a budget "
    "replaces it -- for vae at every group --, or the VampPrior), the conditional priors p(",
    latent("l"), " | ", latent("<l"), ") of the residual kinds (learned, as in the paper, or "
    "recentred on the posteriors), trunk widths per scale (top-down), trainable parameters, and "
    "training steps. Wall time is that of the last training session (a resumed run restarts it).",
)


def overview_row(run: Run) -> list[Cell]:
    supervised, z_p, size = run.model("supervised"), run.model("z_p"), run.model("image_size")
    cells = [
        name_cell(run),
        cell(run.model("kind", "?")),
        cell("yes" if supervised else "no" if supervised is not None else "?"),
        cell(f"z{z_p}" if z_p is not None else "?"),
        cell(prior_label(run)),
        cell(conditional_label(run)),
        cell(widths_label(run)),
        cell(" x ".join(map(str, size)) if isinstance(size, list) else "?"),
        cell(f"{run.parameters:,}" if run.parameters is not None else "n/a", run.parameters),
    ]
    if run.summary is None:
        cells.append(cell(missing=missing(run.command(TRAIN)), colspan=3))
    else:
        steps, skipped = run.summary.get("steps"), run.summary.get("skipped_steps")
        wall = run.summary.get("wall_s_this_session")
        cells += [cell(steps, steps), cell(skipped, skipped), cell(number(wall, 1), wall)]
    return [*cells, cell(run.path, classes=["name"])]


def overview_section(runs: Sequence[Run]) -> Section:
    header = ["run", "kind", "supervised", [Z_P], ["prior of ", latent("0")],
              ["priors of ", latent("1..L")], "widths", "image (px)", "parameters", "steps",
              "skipped steps", "wall time (s)", "folder"]
    blocks = [table(header, [overview_row(r) for r in runs], OVERVIEW_CAPTION)]
    caches = {str(((r.config or {}).get("data") or {}).get("cache")) for r in runs}
    if len(caches) > 1:
        blocks.append(note(f"The runs were trained on different data caches "
                           f"({', '.join(sorted(caches))}): their metrics are not comparable."))
    return section("Runs", blocks)


def prior_label(run: Run) -> str:
    kind = run.model("kind")
    if kind is None:
        return "?"
    if kind in VAMPPRIOR_KINDS:
        return "VampPrior"
    return "fitted N(m, s²)" if run.model("unconditional_prior") == "fitted" else "N(0, I)"


def conditional_label(run: Run) -> str:
    kind = run.model("kind")
    if kind is None:
        return "?"
    if kind == "vae":
        return "as z_0 (none conditional)"
    return "recentred" if run.model("conditional_prior") == "recentred" else "learned"


def widths_label(run: Run) -> str:
    widths = run.model("widths")
    return "/".join(map(str, widths)) if isinstance(widths, list) else str(run.model("width", "?"))


def fid_sizes(runs: Sequence[Run]) -> str:
    """The N behind the FIDs of ``runs``, e.g. "N = 288 inputs, 2048 prior draws"."""
    sizes = sorted({(dig(r.metrics, ("fid", "inputs"))[1] or dig(r.metrics, ("slices",))[1],
                     dig(r.metrics, ("fid", "samples"))[1])
                    for r in runs if dig(r.metrics, ("fid",))[0]}, key=str)
    return "; ".join(f"N = {i} inputs, {s} prior draws" for i, s in sizes) or "N not recorded"


def floor_row(floor: dict) -> list[Cell]:
    """Table 1's reference row: real slices of another split, FID and KID columns only."""
    cells = [cell(f"real {floor.get('split', '?')} slices (floor)", classes=["name"]),
             cell("real"), cell(""), cell(f"{floor.get('slices', '?')} slices")]
    for _, keys, decimals, _ in TABLE1:
        if keys[0] == "fid" and keys[1].startswith("fid_"):
            cells.append(estimate_cell(floor.get("fid"), decimals))
        elif keys[0] == "fid" and keys[1].startswith("kid_"):
            cells.append(estimate_cell(floor.get("kid"), decimals))
        else:
            cells.append(cell(""))
    return cells


def metric_cell(run: Run, keys: Sequence[str], decimals: int, best: bool) -> Cell:
    present, entry = dig(run.metrics, keys)
    if not present:
        return cell(missing=missing(run.command("evaluate")), classes=["text"])
    return estimate_cell(entry, decimals, best)


def estimate_cell(entry: Any, decimals: int, best: bool = False) -> Cell:
    """A stored estimate (a dict with mean and interval) or a plain number, as a cell."""
    if entry is None:
        return cell(missing=absent("absent"))
    classes = ["best"] if best else []
    if not isinstance(entry, dict):
        return cell(number(entry, decimals), entry, classes)
    mean = entry.get("mean")
    return cell(number(mean, decimals), mean, classes,
                detail=interval(entry.get("ci_low"), entry.get("ci_high"), decimals))


def metric_mean(run: Run, keys: Sequence[str]) -> Any:
    entry = dig(run.metrics, keys)[1]
    return entry.get("mean") if isinstance(entry, dict) else entry


def table1_row(run: Run, best: Mapping[tuple, bool]) -> list[Cell]:
    """A run's row of Table 1; ``best``: whether it holds the best value of a column (by keys)."""
    cells = [name_cell(run), cell(run.model("kind", "?"))]
    if run.metrics is None:
        return [*cells, cell(missing=missing(run.command("evaluate")), colspan=len(TABLE1) + 2)]
    s = dig(run.metrics, ("nll", "iw_samples"))[1]
    split = run.metrics.get("split", "?")
    cells += [cell(s, s), cell(f"{split} ({run.metrics.get('slices', '?')} slices, "
                               f"{run.metrics.get('subjects', '?')} subjects)")]
    return cells + [metric_cell(run, keys, decimals, best[keys])
                    for _, keys, decimals, _ in TABLE1]


def table1_caption(runs: Sequence[Run]) -> str:
    return (
        "Table 1 analogue: reconstruction quality on the test split, each as mean [95% CI]; best "
        "per column marked ★ (lower NLL and FID, higher PSNR and SSIM). NLL is the "
        "importance-weighted bound with S samples, in nats per slice and bits per dimension, of "
        "the slice binned into 256 levels over the standardised window -4..4 (edge bins open): "
        "a code length, never below 0; NLL move S to 4S: how much the bound fell on the first "
        "slices when S was quadrupled (more than half the NLL's interval: not converged, "
        "raise S); bits/pixel brain and background: -log2 P(x | posterior "
        "means) per pixel inside the brain mask and outside it, where the bits go; continuous "
        "NLL: the same bound with the Gaussian density the model trains with, unbounded on a "
        "constant background (it can fall below 0, and ranks background modelling rather than "
        "brains, so no best is marked). PSNR in dB "
        "and SSIM of posterior-mean reconstructions over the whole slice and inside the brain "
        "mask; FID (Inception pool3) of reconstructions and of prior samples against the inputs "
        f"({fid_sizes(runs)}: FID is biased, it falls as N grows, so compare it at equal N "
        "only; KID is not biased and carries the spread over subsets), and the floor: another "
        "split's real slices against the same inputs, what a perfect model would score; "
        "brain-like: the fraction of prior samples at temperature T "
        "that pass the brain-shape test (Wilson interval), and of the real test slices (the "
        "reference); shape diversity: mean pairwise 1 - Dice of their brain outlines (0: one "
        "shape drawn again and again; nearer the real slices' value is better); 2nd stage: the "
        "same for draws of the second-stage prior, a Gaussian mixture fitted after training to "
        "the training posteriors' residuals of every group and decoded top-down "
        "(models.second_stage), its spread calibrated on the validation slices (and, where a "
        "run's config sets second_stage.detail_steps, its finest group's detail off the "
        "mixture's span drawn by a diffusion model, models.detail, fitted for the steps shown; "
        "0: none), at the same N "
        "as the prior samples; copy ratio: the draws' median distance to their nearest "
        "training reconstruction over that of the test slices (1: as new as unseen slices, 0: "
        "copies of training slices), near copies: the fraction of draws nearer than 5% of the "
        "test slices are (0.05 for new slices); for the 2nd stage the test slices are decoded "
        "from their codes projected onto its span, the nearest it can draw to each "
        "(evaluation.novelty)."
    )


def table1_section(runs: Sequence[Run]) -> Section:
    best = {keys: best_rows([metric_mean(r, keys) for r in runs], better)
            for _, keys, _, better in TABLE1}
    rows = [table1_row(run, {keys: i in rows for keys, rows in best.items()})
            for i, run in enumerate(runs)]
    floor = next((f for r in runs if (f := dig(r.metrics, ("fid", "floor"))[1])), None)
    if floor:
        rows.append(floor_row(floor))
    header = ["run", "kind", "S", "split", *(h for h, *_ in TABLE1)]
    blocks = [table(header, rows, table1_caption(runs))]
    methods = sorted({str(dig(r.metrics, ("nll", "nats_per_slice", "ci_method"))[1])
                      for r in runs if r.metrics is not None} - {"None"})
    if methods:
        blocks.append(note(f"Intervals: {'; '.join(methods)}."))
    return section("Reconstruction (Table 1)", blocks)


def r2_cell(value: Any, bounds: Any, outlined: bool) -> Cell:
    """A test R² of the Table 4 grid: shaded from 0 to 1, greyed when negative."""
    low, high = bounds or (None, None)
    text, detail = (number(value, 2), interval(low, high, 2)) if low is not None \
        else (number(value, 3), None)
    classes = ["zp"] if outlined else []
    if finite(value) and value < 0:  # worse than predicting the mean: no shade
        return cell(text, value, [*classes, "negative"], detail=detail)
    return cell(text, value, classes, colour(value, 0.0, 1.0), detail=detail)


def r2_row(run: Run, unit: str, groups: Sequence[str]) -> list[Cell]:
    present, entry = dig(run.analysis, ("table4", unit))
    width = max(len(groups), 1)
    if run.analysis is None:
        return [name_cell(run), cell(missing=missing(run.command(ANALYZE)), colspan=width)]
    if not present:
        return [name_cell(run), cell(missing=absent(f"no {unit}-level R² in analysis.json"),
                                     colspan=width)]
    z_p = f"z{run.model('z_p')}" if run.model("supervised") else None
    return [name_cell(run), *(r2_cell((entry.get("r2") or {}).get(g),
                                      (entry.get("r2_ci") or {}).get(g), g == z_p)
                              for g in groups)]


def r2_table(runs: Sequence[Run], unit: str) -> Block:
    groups = group_order(g for r in runs for g in dig(r.analysis, ("table4", unit, "r2"))[1] or {})
    targets = {str(entry.get("target")) for r in runs
               for present, entry in [dig(r.analysis, ("table4", unit))] if present}
    level = "subject level, the paper's analogue" if unit == "subject" else "slice level"
    caption = (
        f"Lasso test R² per latent group ({level}) against {', '.join(sorted(targets))}; "
        "cells shaded from 0 (white) to 1 (dark green), negative R² in grey; a supervised run's ",
        Z_P, " is outlined in red. Brackets: 95% bootstrap interval over the test subjects (the "
        "test set's sampling error; analyses from before it have none).",
    )
    return table(["run", *groups], [r2_row(r, unit, groups) for r in runs], caption)


def table4_section(runs: Sequence[Run]) -> Section:
    return section("Latent informativeness (Table 4)",
                   [r2_table(runs, "subject"), r2_table(runs, "slice")])


def sensitivity_row(run: Run, groups: Sequence[str], high: float) -> list[Cell]:
    """A run's sensitivity ratio per group (shaded from 0 to ``high``), post-hoc and configured
    z_P."""
    present, entry = dig(run.analysis, ("sensitivity",))
    width = len(groups) + 2
    if run.analysis is None:
        return [name_cell(run), cell(missing=missing(run.command(ANALYZE)), colspan=width)]
    if not present:
        return [name_cell(run), cell(missing=absent("no sensitivity in analysis.json (no "
                                                    "pathology examples)"), colspan=width)]
    ratio, posthoc = entry.get("ratio") or {}, entry.get("z_p_posthoc")
    z_p = run.model("z_p")
    configured = f"z{z_p}" if z_p is not None else "?"
    return [name_cell(run),
            *(cell(number(ratio.get(g), 2), ratio.get(g), ["best"] if g == posthoc else [],
                   colour(ratio.get(g), 0.0, high, "Oranges")) for g in groups),
            cell(posthoc if posthoc is not None else "n/a"),
            cell(configured + (" (supervised)" if run.model("supervised") else ""))]


def sensitivity_section(runs: Sequence[Run]) -> Section:
    ratios = [dig(r.analysis, ("sensitivity", "ratio"))[1] or {} for r in runs]
    groups = group_order(g for ratio in ratios for g in ratio)
    high = max((v for ratio in ratios for v in ratio.values() if finite(v)), default=1.0)
    regions = {str(entry.get("regions")) for r in runs
               for present, entry in [dig(r.analysis, ("sensitivity",))]
               if r.analysis is not None and present}
    caption = (
        "Pathology sensitivity (Fig. 6c analogue): each group's code scaled by a set of factors "
        "and decoded; the ratio is the summed change inside the pathology region over that in the "
        f"reference region ({', '.join(sorted(regions)) or 'n/a'}). The group with the "
        "highest ratio (marked ★) is the post-hoc ", Z_P, "; shading from 0 to the largest ratio "
        "in the table.",
    )
    header = ["run", *groups, ["post-hoc ", Z_P], ["configured ", Z_P]]
    rows = [sensitivity_row(r, groups, high) for r in runs]
    return section("Pathology sensitivity", [table(header, rows, caption)])


def dci_row(run: Run) -> list[Cell]:
    present, entry = dig(run.analysis, ("dci",))
    width = len(DCI_COLUMNS) + 1
    if run.analysis is None:
        return [name_cell(run), cell(missing=missing(run.command(ANALYZE)), colspan=width)]
    if not present:
        return [name_cell(run), cell(missing=absent("no DCI in analysis.json"), colspan=width)]
    return [name_cell(run), *(cell(number(entry.get(key), 3), entry.get(key))
                              for _, key in DCI_COLUMNS),
            cell(len(entry.get("factors") or []))]


def dci_section(runs: Sequence[Run]) -> Section:
    settings = {f"{entry.get('unit')} level, {entry.get('method')} importances, "
                f"alpha {entry.get('alpha')}" for r in runs
                for present, entry in [dig(r.analysis, ("dci",))]
                if r.analysis is not None and present}
    caption = (
        "DCI of the posterior-mean codes against the phantom's generating factors: "
        "disentanglement D and completeness C per latent group and per code unit (0-1, higher is "
        "better), and informativeness as the mean test R² over factors "
        f"({'; '.join(sorted(settings)) or 'n/a'})."
    )
    header = ["run", *(h for h, _ in DCI_COLUMNS), "factors"]
    return section("Disentanglement (DCI)",
                   [table(header, [dci_row(r) for r in runs], caption)])


def rate_cell(rates: Any, best: bool = False) -> Cell:
    if not isinstance(rates, dict):
        return cell(missing=absent("absent"))
    value = rates.get("invalid_fraction")
    return cell(number(value, 4), value, ["best"] if best else [],
                detail=interval(rates.get("ci_low"), rates.get("ci_high"), 4))


def detection_rows(run: Run) -> list[list[Cell]]:
    """A run's rows of lesion detection, one per score, or one saying why there are none."""
    found = run.counterfactual
    if found is None:
        why = (absent("not applicable: lesion detection is defined for MS cohorts")
               if validity_not_applicable(run) else missing(run.command("counterfactual")))
        return [[name_cell(run), cell(missing=why, colspan=8)]]
    groups = ", ".join(f"z{g}" for g in found.get("pathology_groups") or [])
    rows = []
    if found.get("not_scored"):
        rows.append([name_cell(run), cell(missing=absent(f"not scored: {found['not_scored']}"),
                                          colspan=8)])
    for score, row in (found.get("detection") or {}).items():
        rows.append([
            name_cell(run), cell(found.get("model", run.model("kind", "?"))), cell(groups),
            cell(score, classes=["name"]),
            estimate_cell(row.get("auprc"), 3), estimate_cell(row.get("dice"), 3),
            estimate_cell(row.get("best_dice"), 3),
            estimate_cell(row.get("load_correlation"), 3),
            cell(row.get("n_subjects"), row.get("n_subjects")),
        ])
    return rows


def detection_section(runs: Sequence[Run]) -> Section:
    """Pseudo-healthy lesion detection against its baselines, one row per run and score."""
    header = ["run", "kind", "pathology groups", "score", "AUPRC", "Dice (val threshold)",
              "best Dice (optimistic)", "lesion-load r", "test subjects"]
    caption = (
        "Voxel-level detection of the phantom's lesions inside the brain on the test split, mean "
        "[95% subject-bootstrap CI]. Scores: the positive residual of the slice against its "
        "pseudo-healthy reconstruction (pathology groups at their prior mean given the groups "
        "above), the positive residual of the plain reconstruction, and the intensity itself. "
        "Dice uses the threshold that maximised Dice on the validation split; best Dice fits it "
        "on the test split (optimistic); lesion-load r correlates each subject's detected and "
        "true lesion voxels. Read it as: pseudo-healthy reconstruction helps where its AUPRC "
        "interval lies above both baselines'.")
    rows = [row for run in runs for row in detection_rows(run)]
    return section("Lesion detection by pseudo-healthy reconstruction",
                   [table(header, rows, caption)])


def edit_rows(runs: Sequence[Run], width: int, cells: Callable[[dict], list[Cell]]
              ) -> list[list[Cell]]:
    """One row per run: its kind, pathology groups and ``cells`` of its counterfactual.json, or
    why there are none."""
    rows = []
    for run in runs:
        found = run.counterfactual
        if found is None or not found.get("swap"):
            why = (absent("not applicable: edits are scored on MS cohorts")
                   if validity_not_applicable(run)
                   else absent(f"not scored: {found['not_scored']}")
                   if found and found.get("not_scored")
                   else missing(run.command("counterfactual")))
            rows.append([name_cell(run), cell(missing=why, colspan=width)])
            continue
        groups = ", ".join(f"z{g}" for g in found.get("pathology_groups") or [])
        rows.append([name_cell(run), cell(found.get("model", run.model("kind", "?"))),
                     cell(groups), *cells(found)])
    return rows


def swap_cells(found: dict) -> list[Cell]:
    """A run's cells of the scored swap (its counterfactual record ``found``)."""
    swap = found["swap"]
    effect, anatomy = swap["effectiveness"], swap["anatomy"]
    factors = anatomy.get("factors") or {}
    return [
        cell(swap["pairs"], swap["pairs"]),
        estimate_cell(effect["area_correlation"], 3),
        estimate_cell(effect["reference_a_reconstruction"]["area_correlation"], 3),
        estimate_cell(effect["lesion_dice_where_allowed"], 3),
        estimate_cell(swap["minimality"], 3),
        estimate_cell(anatomy["tissue_dice"]["WM"], 3),
        estimate_cell(anatomy["reference_b_reconstruction"]["WM"], 3),
        estimate_cell((factors.get("mix") or {}).get("mean_r2_held"), 3),
        estimate_cell((factors.get("b") or {}).get("mean_r2_held"), 3),
    ]


def soundness_cells(found: dict) -> list[Cell]:
    """A run's cells of the edits' soundness."""
    swap, conditional = found["swap"], found["conditional"]
    once, tenfold = found["composition"]["1"], found["composition"]["10"]
    return [
        estimate_cell(swap["reversibility"]["psnr"], 1),
        estimate_cell(once["psnr"], 1), estimate_cell(tenfold["psnr"], 1),
        estimate_cell(tenfold["lesion_area_drift_mm2"], 0),
        estimate_cell(conditional["lesion_area_spread_mm2"], 1),
        estimate_cell(conditional["lesion_in_valid_tissue"], 3),
        estimate_cell(conditional["tissue_dice"]["WM"], 3),
    ]


def swap_section(runs: Sequence[Run]) -> Section:
    """The scored pathology swap, one row per run."""
    header = ["run", "kind", "pathology groups", "pairs", "lesion area r", "(a's reconstruction)",
              "Dice where b allows", "minimality", "WM Dice", "(b's reconstruction)",
              "factor R² from mix z_A", "(from b's z_A)"]
    caption = (
        "The mix P(a) + A(b): slice a's pathology groups over slice b's other groups, for test "
        "pairs chosen as the style-mix figure chooses them; mean [95% CI over a's subjects]. "
        "Effectiveness: the lesion segmenter's area on the mix against a's true area (Pearson r; "
        "a's own reconstruction beside it is the ceiling), and the Dice of its lesion map with "
        "a's lesions inside b's GM, WM or hippocampus. Minimality: the mean change from b's "
        "reconstruction outside both slices' lesions over the change inside (0: only lesions "
        "change; 1: the whole brain changes as much). Anatomy kept: the tissue segmenter's WM "
        "Dice against b's true labels, and the mean R² of the non-pathology factors that a ridge "
        "on training z_A codes predicts (those reaching R² 0.5 on validation), from the mix's "
        "re-encoded z_A beside b's own. Read it as: a sound swap has r near the ceiling, "
        "minimality near 0, and WM Dice and factor R² near b's own.")
    return section("Pathology swap, scored",
                   [table(header, edit_rows(runs, 11, swap_cells), caption)])


def soundness_section(runs: Sequence[Run]) -> Section:
    """The edits' reversibility, composition and conditional redraws, one row per run."""
    header = ["run", "kind", "pathology groups", "swapped back: PSNR (dB)", "null edit x1: PSNR",
              "null edit x10: PSNR", "x10 lesion-area drift (mm²)",
              "z_P redraw: area spread (mm²)", "redrawn lesions in valid tissue",
              "redraw WM Dice"]
    caption = (
        "Reversibility: P(b) + A(mix) against b's reconstruction. Composition: the null edit "
        "(encode, decode) applied to a slice's first reconstruction once and 10 times, against "
        "that reconstruction. Conditional synthesis: a slice's anatomy groups kept and its "
        "pathology groups redrawn from the prior (T = 1) several times: the spread of the "
        "segmented lesion areas, the fraction of their voxels in the slice's true GM, WM or "
        "hippocampus, and the WM Dice against its true labels. Read it as: sound edits keep "
        "PSNR high and drift near 0; a pathology code that varies lesions puts them in valid "
        "tissue while the anatomy holds.")
    return section("Soundness of the edits",
                   [table(header, edit_rows(runs, 9, soundness_cells), caption)])


def validity_not_applicable(run: Run) -> bool:
    return dig(run.analysis, ("pathology",))[1] == "ad"


def validity_rate_row(run: Run, v: dict, best: bool) -> list[Cell]:
    """One run's row of the invalid-lesion rates."""
    samples = v.get("samples") or {}
    return [
        name_cell(run), cell(v.get("model", run.model("kind", "?"))),
        rate_cell(samples, best), cell(samples.get("n"), samples.get("n")),
        estimate_cell(v.get("brain_like"), 3),
        rate_cell(dig(v, ("second_stage", "samples"))[1]),
        rate_cell(v.get("reconstructions")), rate_cell(v.get("real")),
        rate_cell(v.get("truth")),
        cell(f"{v.get('temperature')}"),
    ]


def segmenter_row(run: Run, v: dict, tissue: Sequence[str]) -> list[Cell]:
    """The accuracy of the segmenters that judged one run's samples."""
    seg = v.get("segmenters") or {}
    dice = seg.get("tissue_dice") or {}
    return [name_cell(run),
            *(cell(number(seg.get(k), 3), seg.get(k))
              for k in ("lesion_dice", "lesion_precision", "lesion_recall")),
            *(cell(number(dice.get(t), 3), dice.get(t)) for t in tissue)]


def label_rows(run: Run, v: dict, labels: Sequence[str]) -> list[list[Cell]]:
    """Where one run's lesion-like voxels fall, a row per source (samples, real, truth)."""
    rows = []
    for source in ("samples", "real", "truth"):
        shares = dig(v, (source, "per_label"))[1] or {}
        rows.append([name_cell(run), cell(source, classes=["name"]),
                     *(cell(number(shares.get(t), 3), shares.get(t)) for t in labels)])
    return rows


RATES_CAPTION = (
    "Fraction of lesion-like voxels in anatomically invalid places, mean [95% bootstrap CI "
    "over slices]: the model's prior samples, the second-stage prior's draws, the model's "
    "reconstructions of the test slices (the floor for decoded images), the real test slices "
    "segmented the same way (the reference rate), and the ground-truth masks on the "
    "ground-truth tissue labels (0 by construction). "
    "Samples are counted only when they pass the brain-shape test; brain-like gives the "
    "fraction that did (n counts them). "
    "Lowest sample rate marked ★."
)


def validity_section(runs: Sequence[Run]) -> Section:
    best = best_rows([dig(r.validity, ("samples", "invalid_fraction"))[1] for r in runs], "min")
    tissue = list(dict.fromkeys(
        k for r in runs for k in dig(r.validity, ("segmenters", "tissue_dice"))[1] or {}))
    labels = list(dict.fromkeys(
        k for r in runs for src in ("samples", "real", "truth")
        for k in dig(r.validity, (src, "per_label"))[1] or {}))
    rates, segmenters, shares = [], [], []
    for i, run in enumerate(runs):
        if run.validity is None:
            why = (absent("not applicable: sample validity is defined for MS cohorts")
                   if validity_not_applicable(run) else missing(run.command(VALIDITY)))
            rates.append([name_cell(run), cell(missing=why, colspan=9)])
            segmenters.append([name_cell(run), cell(missing=why, colspan=3 + len(tissue))])
            shares.append([name_cell(run), cell(missing=why, colspan=1 + len(labels))])
            continue
        rates.append(validity_rate_row(run, run.validity, i in best))
        segmenters.append(segmenter_row(run, run.validity, tissue))
        shares += label_rows(run, run.validity, labels)
    definitions = sorted({str(r.validity.get("definition")) for r in runs if r.validity})
    blocks = [*(note(f"Definition: {d}") for d in definitions), table(
        ["run", "kind", "samples", "samples (n)", "brain-like", "2nd-stage samples",
         "reconstructions", "real test slices", "ground truth", "temperature"], rates,
        RATES_CAPTION)]
    if any(r.validity is not None for r in runs):
        blocks.append(table(
            ["run", "lesion Dice", "lesion precision", "lesion recall",
             *(f"Dice {t}" for t in tissue)], segmenters,
            "Accuracy of the segmenters (trained on the phantom's ground truth, scored on its "
            "held-out test split) that judge the samples."))
    if labels:
        blocks.append(table(["run", "source", *labels], shares,
                            "Where lesion-like voxels fall: the share on each tissue label."))
    return section("Sample validity", blocks)


# ---- training curves ---------------------------------------------------------------------------


def curve_series(runs: Sequence[Run], column: str) -> list[tuple[str, pd.Series]]:
    """(run name, value by step) of one metrics.csv column, per run that logged it."""
    out = []
    for run in runs:
        if run.curves is None or column not in run.curves.columns:
            continue
        rows = run.curves[["step", column]].dropna()
        rows = rows.drop_duplicates("step", keep="last").sort_values("step")
        if len(rows):
            out.append((run.name, pd.Series(rows[column].to_numpy(float), rows["step"])))
    return out


def png_bytes(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def plot_lines(ax: plt.Axes, series: Sequence[tuple[str, pd.Series]]) -> None:
    for name, values in series:
        ax.plot(values.index, values.to_numpy(), marker="." if len(values) < 20 else None,
                label=name, linewidth=1)
    positive = np.concatenate([s.to_numpy() for _, s in series])
    positive = positive[np.isfinite(positive)]
    # losses and KLs span decades early in training; a log axis keeps the late part readable
    if len(positive) and positive.min() > 0 and positive.max() / positive.min() > 100:
        ax.set_yscale("log")
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def curve_figure(runs: Sequence[Run], column: str, title: str, ylabel: str) -> bytes | None:
    if not column.endswith("_"):
        series = curve_series(runs, column)
        if not series:
            return None
        fig, ax = plt.subplots(figsize=(5, 3.2))
        plot_lines(ax, series)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        return png_bytes(fig)
    columns = sorted({c for r in runs if r.curves is not None for c in r.curves.columns
                      if c.startswith(column)}, key=lambda c: (len(c), c))
    panels = [(c, curve_series(runs, c)) for c in columns]
    panels = [(c, s) for c, s in panels if s]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels) + 0.6, 2.8),
                             squeeze=False)
    for ax, (c, series) in zip(axes[0], panels, strict=True):
        plot_lines(ax, series)
        ax.set_title(c.removeprefix(column.rstrip("_").rsplit("/", 1)[0] + "/"), fontsize=8)
    axes[0, 0].set_ylabel(ylabel, fontsize=8)
    axes[0, -1].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return png_bytes(fig)



def curves_missing(run: Run) -> dict:
    if run.summary is not None:  # trained: resuming would not bring the curves back
        return absent("metrics.csv is missing; curves are logged only while a run trains, so "
                      "these cannot be drawn again")
    return missing(run.command(TRAIN))


def curve_plot(runs: Sequence[Run], column: str, title: str, ylabel: str) -> Block | None:
    """The figure of one of CURVES, or None where no run logged it."""
    content = curve_figure(runs, column, title, ylabel)
    if content is None:
        return None
    group = column.endswith("_")
    return figure(content, f"{title} ({ylabel}) against training step, one line per run "
                  f"(metrics.csv column {column}{'*' if group else ''}; a step logged twice "
                  "keeps its later row).", title, "panels" if group else "curve")


def curves_section(runs: Sequence[Run]) -> Section:
    blocks = [status(r.name, curves_missing(r)) for r in runs if r.curves is None]
    plots = [p for p in (curve_plot(runs, *curve) for curve in CURVES) if p is not None]
    if plots or any(r.curves is not None for r in runs):
        if not plots:
            blocks.append(status(None, absent("metrics.csv holds none of the plotted metrics")))
        blocks.append({"kind": "figures", "figures": plots})
    return section("Training curves", blocks)


# ---- figures of the run folders -----------------------------------------------------------------


def figure_caption(png: Path) -> str:
    text = caption_path(png)
    if text.is_file():
        first = text.read_text(errors="replace").strip().splitlines()
        if first and first[0].strip():
            return first[0].strip()
    return BUILTIN_CAPTIONS.get(png.stem, f"{png.name} (no caption file)")


def expected_figures(run: Run) -> list[tuple[str, str]]:
    """(figure name, command that writes it) of the figures this run should have."""
    out = []
    for stem, verb, extra in EXPECTED_FIGURES:
        if stem == "synth_clusters" and run.model("kind") not in VAMPPRIOR_KINDS:
            continue  # the pseudo-input clusters exist for VampPrior kinds only
        if stem == "sample_validity" and validity_not_applicable(run):
            continue
        out.append((stem, run.command(verb, extra)))
    return out


def run_figure(run: Run, stem: str, png: Path | None, command: str | None) -> Block:
    """The figure ``stem`` of a run, or a line saying why it is not there."""
    if png is None:
        trained = run.summary is not None and command == run.command(TRAIN)
        return status(f"{stem}.png", absent("missing; it is drawn only while the run trains")
                      if trained else missing(command))
    content = png.read_bytes()
    if not content.startswith(PNG_SIGNATURE):
        return status(png.name, absent("not a PNG file"))
    return figure(content, figure_caption(png), f"{run.name}: {stem}", file=f"figures/{png.name}")


def synthesis_note(synthesis: dict) -> Block:
    groups = ", ".join(f"z{g}" for g in synthesis.get("pathology_groups") or []) or "none"
    return note(f"Synthesis: pathology groups {groups} (from "
                f"{synthesis.get('pathology_source', '?')}), seed {synthesis.get('seed', '?')}.")


def run_figures(run: Run) -> Section:
    """A run's figures, expected ones first (or what computes them), then any others by name."""
    folder = run.path / "figures"
    pngs = {p.stem: p for p in sorted(folder.glob("*.png"))} if folder.is_dir() else {}
    commands = dict(expected_figures(run))
    order = [*commands, *(stem for stem in pngs if stem not in commands)]
    blocks = [synthesis_note(run.synthesis)] if run.synthesis is not None else []
    blocks += [run_figure(run, s, pngs.get(s), commands.get(s)) for s in order]
    return section(run.name, blocks)


def figures_section(runs: Sequence[Run]) -> Section:
    return section("Figures", [], [run_figures(r) for r in runs])


# ---- the page -----------------------------------------------------------------------------------


def claims_section(claims: Sequence[dict]) -> Section:
    """The paper's claims as checked on these runs (``evaluation.claims``), verdict and numbers."""
    rows = [[cell(c["source"]), cell(c["claim"]), cell(verdict_text(c)), cell(c["evidence"])]
            for c in claims]
    caption = ("Each claim compares point estimates across the runs; the numbers behind it are "
               "beside, with 95% intervals where the metric has them, so a difference inside the "
               "noise is visible. Over several training seeds a claim is checked on each seed's "
               "grid and holds when it holds in every seed (a sign test: a coin-flip claim is "
               "unanimous over N seeds with probability 2^(1-N)).")
    return section("The paper's claims on these runs",
                   [table(["source", "claim", "verdict", "evidence"], rows, caption)])


def stored(source: str, *keys: str) -> Callable[[Run], Any]:
    """A getter of the number at ``keys`` in one of a run's files (``source``, a Run attribute);
    "z_P" in keys stands for the run's configured pathology group, an estimate gives its mean."""
    def value(run: Run) -> Any:
        z_p = f"z{run.model('z_p')}"
        found = dig(getattr(run, source), [z_p if k == "z_P" else k for k in keys])[1]
        return found.get("mean") if isinstance(found, dict) else found
    return value


def fid_ratio(run: Run) -> float | None:
    """FID of second-stage draws over FID of reconstructions: how far the draws are from what
    the model can decode (the generation issue's target is at most 2)."""
    draws = stored("metrics", "fid", "fid_samples_second_stage")(run)
    recon = stored("metrics", "fid", "fid_reconstruction")(run)
    return draws / recon if finite(draws) and finite(recon) and recon > 0 else None


# The numbers shown over training seeds: (header, getter, decimals).
SEED_COLUMNS = (
    ("PSNR (dB)", stored("metrics", "reconstruction", "psnr"), 2),
    ("NLL (bits/dim)", stored("metrics", "nll", "bits_per_dim"), 4),
    ("FID recon.", stored("metrics", "fid", "fid_reconstruction"), 1),
    ("FID samples T=1", stored("metrics", "fid", "fid_samples"), 1),
    ("FID 2nd-stage samples", stored("metrics", "fid", "fid_samples_second_stage"), 1),
    ("FID ratio 2nd stage / recon.", fid_ratio, 2),
    ("KID 2nd-stage samples", stored("metrics", "fid", "kid_samples_second_stage"), 4),
    ("brain-like T=0.8", stored("metrics", "plausibility", "samples", "0.8", "brain_like"), 3),
    ("brain-like T=1", stored("metrics", "plausibility", "samples", "1.0", "brain_like"), 3),
    ("brain-like 2nd stage", stored("metrics", "plausibility", "second_stage", "brain_like"), 3),
    ("copy ratio 2nd stage", stored("metrics", "novelty", "second_stage", "distance_ratio"), 2),
    ("R² of z_P, subject", stored("analysis", "table4", "subject", "r2", "z_P"), 3),
    ("R² of z_P, slice", stored("analysis", "table4", "slice", "r2", "z_P"), 3),
    ("invalid lesion fraction, samples", stored("validity", "samples", "invalid_fraction"), 3),
)


def seed_cell(runs: Sequence[Run], value: Callable[[Run], Any], decimals: int) -> Cell:
    """Mean ± standard deviation (n - 1) over the seeds' ``runs``, each seed's value below."""
    values = [value(r) for r in runs]
    present = np.array([v for v in values if finite(v)], dtype=float)
    if len(present) == 0:
        return cell(missing=absent("n/a"))
    mean = float(present.mean())
    spread = float(present.std(ddof=1)) if len(present) > 1 else float("nan")
    return cell(f"{number(mean, decimals)} ± {number(spread, decimals)}", mean,
                detail=", ".join(number(v, decimals) for v in values))


def seeds_section(replicates: Mapping[str, Sequence[Run]]) -> Section:
    """Each grid run's numbers over its training seeds, so a reader sees which differences
    between runs exceed the seeds'."""
    rows = [[cell(name, classes=["name"]), cell(len(runs), len(runs)),
             *(seed_cell(runs, value, decimals) for _, value, decimals in SEED_COLUMNS)]
            for name, runs in replicates.items()]
    caption = (
        "Each run of the grid trained with several seeds (seed s in NAME_seedS; the tables "
        "above show seed 0): mean ± standard deviation over seeds, then each seed's "
        "value in seed order (n/a where a seed lacks it). A difference between two runs that is "
        "smaller than their seeds' spread is not an ordering."
    )
    header = ["run", "seeds", *(h for h, *_ in SEED_COLUMNS)]
    return section("Spread over training seeds", [table(header, rows, caption)])


def seconds_row(label: str, stages: Sequence[str], times: Mapping[str, float]) -> list[Cell]:
    known = [times[s] for s in stages if finite(times.get(s))]
    total = sum(known) if len(known) == len(stages) else None
    return [cell(label, classes=["name"]),
            *(cell(number(times.get(s), 0), times.get(s)) for s in stages),
            cell(number(total, 0) if total is not None else "incomplete", total)]


def time_section(seconds: Mapping[str, Mapping[str, float]]) -> Section:
    """Seconds per stage of every run folder, as `pathanat reproduce` recorded them, and their
    sums: what the grid cost on the machine it ran on."""
    # in the order of the fullest record: a run found trained records no "train" to lead with
    stages = list(dict.fromkeys(stage for times in sorted(seconds.values(), key=len, reverse=True)
                                for stage in times))
    rows = [seconds_row(folder, stages, times) for folder, times in seconds.items()]
    sums = {s: sum(t[s] for t in seconds.values() if finite(t.get(s))) for s in stages}
    rows.append(seconds_row("all runs (stages recorded)", stages, sums))
    caption = (
        "Wall-clock seconds of each stage of each run folder, as `pathanat reproduce` recorded "
        "them in reproduce.json on the machine it ran on; n/a where the stage ran outside the "
        "record (found done), and a training resumed from a checkpoint counts only its last "
        "piece. Times taken while other work shared the machine are inflated; the record does "
        "not know which."
    )
    header = ["run folder", *stages, "total"]
    return section("Time per stage", [table(header, rows, caption)])


def report_sections(runs: Sequence[Run], claims: Sequence[dict] | None,
                    replicates: Mapping[str, Sequence[Run]] | None,
                    seconds: Mapping[str, Mapping[str, float]] | None = None) -> list[Section]:
    return [
        overview_section(runs),
        *([claims_section(claims)] if claims else []),
        *([seeds_section(replicates)] if replicates else []),
        *([time_section(seconds)] if seconds else []),
        table1_section(runs),
        table4_section(runs),
        sensitivity_section(runs),
        dci_section(runs),
        validity_section(runs),
        detection_section(runs),
        swap_section(runs),
        soundness_section(runs),
        curves_section(runs),
        figures_section(runs),
    ]


def report_page(runs: Sequence[Run], title: str, claims: Sequence[dict] | None = None,
                replicates: Mapping[str, Sequence[Run]] | None = None,
                seconds: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """The report as the data its page template draws."""
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {"title": title, "generated": generated, "run_count": len(runs),
            "sections": report_sections(runs, claims, replicates, seconds)}


def report_html(runs: Sequence[Run], title: str, claims: Sequence[dict] | None = None,
                replicates: Mapping[str, Sequence[Run]] | None = None,
                seconds: Mapping[str, Mapping[str, float]] | None = None) -> str:
    return page_template().render(report_page(runs, title, claims, replicates, seconds))


@functools.cache
def page_template() -> jinja2.Template:
    """The page template; autoescaped, as every value it is given is text."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("pathanat", "evaluation/templates"), autoescape=True,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined)
    return environment.get_template(PAGE_TEMPLATE)


def default_report_path(runs: Sequence[str | os.PathLike]) -> Path:
    """RUN/report.html for one run; for several, report.html in their deepest common folder."""
    if not runs:
        raise PathanatError("runs: expected at least one run folder")
    if len(runs) == 1:
        return Path(runs[0]) / REPORT_HTML
    return Path(os.path.commonpath([os.path.abspath(r) for r in runs])) / REPORT_HTML


def write_report(
    runs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    title: str | None = None,
    claims: Sequence[dict] | None = None,
    replicates: Mapping[str, Sequence[str | os.PathLike]] | None = None,
    seconds: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """Write one self-contained HTML report comparing the run folders ``runs`` to ``out``;
    ``claims`` (from ``evaluation.claims.check_claims``) adds a section of verdicts;
    ``replicates`` (name -> the run folders of its training seeds) one of spread over seeds;
    ``seconds`` (run folder -> stage -> seconds, as `pathanat reproduce` records them) one of
    what each stage cost.

    Example: ``write_report(["runs/vae_ms", "runs/nvmp_ms"], "runs/report.html")``.
    Returns the path written.
    """
    if isinstance(runs, str | os.PathLike) or not runs:
        raise PathanatError("runs: expected a list of one or more run folders")
    out = Path(out)
    if out.is_dir():
        raise PathanatError(f"--out {out}: is a folder; expected the HTML file to write")
    paths = [Path(r) for r in runs]
    names = run_names(paths)
    loaded = [read_run(p, n) for p, n in zip(paths, names, strict=True)]
    if title is None:
        title = "pathanat report: " + ", ".join(names)
    seeds = {name: [read_run(p, Path(p).name) for p in folders]
             for name, folders in (replicates or {}).items()}
    with atomic_file(out) as tmp:
        tmp.write_text(report_html(loaded, title, claims, seeds, seconds), encoding="utf-8")
        # the temporary file is private (mkstemp); a report is for sharing: the usual mode
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
    return out
