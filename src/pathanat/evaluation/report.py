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
script, so the one file can be mailed or archived and opens offline. Every string taken from a
file is HTML-escaped.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import functools
import html
import io
import math
import os
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import markupsafe
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


# ---- HTML pieces --------------------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape(str(value))


def missing(command: str) -> str:
    return f'<span class="missing">not computed -- run <code>{esc(command)}</code></span>'


def absent(what: str) -> str:
    return f'<span class="missing">{esc(what)}</span>'


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def number(value: Any, decimals: int) -> str:
    if value is None:
        return "n/a"
    if not finite(value):
        return esc(value)
    return f"{value:.{decimals}f}"


def td(text: str, value: Any = None, classes: Sequence[str] = (), style: str = "",
       colspan: int = 1) -> str:
    """A cell; a numeric ``value`` is kept exactly in data-value (the text is rounded)."""
    attrs = ""
    if classes:
        attrs += f' class="{" ".join(classes)}"'
    if finite(value):
        attrs += f' data-value="{value if isinstance(value, int) else float(value)!r}"'
    if style:
        attrs += f' style="{style}"'
    if colspan > 1:
        attrs += f' colspan="{colspan}"'
    return f"<td{attrs}>{text}</td>"


def with_interval(mean: Any, low: Any, high: Any, decimals: int) -> str:
    """'mean [low, high]', the interval on a line of its own."""
    return (f'{number(mean, decimals)} <span class="ci">[{number(low, decimals)}, '
            f"{number(high, decimals)}]</span>")


def name_cell(run: Run) -> str:
    return td(esc(run.name), classes=["name"])


def table(header: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "") -> str:
    """``header`` and the row cells are HTML already (headers escaped by the caller)."""
    first = ' class="name"'
    head = "".join(f"<th{first if i == 0 else ''}>{h}</th>" for i, h in enumerate(header))
    body = "\n".join(f"<tr>{''.join(cells)}</tr>" for cells in rows)
    # the caption is a paragraph above the table: a <caption> would wrap at the table's width
    cap = f'<p class="caption">{caption}</p>\n' if caption else ""
    return f"{cap}<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>"


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


def figure_html(content: bytes, caption: str, alt: str, kind: str = "", file: str = "") -> str:
    attrs = f' class="{kind}"' if kind else ""
    label = f"<b>{esc(file)}</b>: " if file else ""
    return (f'<figure{attrs}><img src="{png_data_uri(content)}" alt="{esc(alt)}">'
            f"<figcaption>{label}{esc(caption)}</figcaption></figure>")


# ---- sections -----------------------------------------------------------------------------------


def overview_section(runs: Sequence[Run]) -> str:
    rows = []
    for run in runs:
        supervised = run.model("supervised")
        z_p = run.model("z_p")
        size = run.model("image_size")
        cells = [
            name_cell(run),
            td(esc(run.model("kind", "?"))),
            td("yes" if supervised else "no" if supervised is not None else "?"),
            td(esc(f"z{z_p}") if z_p is not None else "?"),
            td(esc(prior_label(run))),
            td(esc(conditional_label(run))),
            td(esc(widths_label(run))),
            td(esc(" x ".join(map(str, size))) if isinstance(size, list) else "?"),
            td(f"{run.parameters:,}" if run.parameters is not None else "n/a", run.parameters),
        ]
        if run.summary is None:
            cells.append(td(missing(run.command(TRAIN)), colspan=3))
        else:
            steps, skipped = run.summary.get("steps"), run.summary.get("skipped_steps")
            wall = run.summary.get("wall_s_this_session")
            cells += [td(esc(steps), steps), td(esc(skipped), skipped),
                      td(number(wall, 1), wall)]
        cells.append(td(esc(run.path), classes=["name"]))
        rows.append(cells)
    header = ["run", "kind", "supervised", "z<sub>P</sub>", "prior of z<sub>0</sub>",
              "priors of z<sub>1..L</sub>", "widths", "image (px)", "parameters", "steps",
              "skipped steps", "wall time (s)", "folder"]
    caches = {str(((r.config or {}).get("data") or {}).get("cache")) for r in runs}
    note = ""
    if len(caches) > 1:
        note = ('<p class="note">The runs were trained on different data caches '
                f"({esc(', '.join(sorted(caches)))}): their metrics are not comparable.</p>")
    return (
        "<h2>Runs</h2>\n"
        + table(header, rows, "Model kind (Table 3 of the paper), whether a lesion-segmentation "
                "head supervises z<sub>P</sub>, the prior of z<sub>0</sub> (N(0, I) as in the "
                "paper, fitted N(m, s²) where a budget replaces it -- for vae at every group --, "
                "or the VampPrior), the conditional priors p(z<sub>l</sub> | "
                "z<sub>&lt;l</sub>) of the residual kinds (learned, as in the paper, or "
                "recentred on the posteriors), trunk "
                "widths per scale (top-down), trainable parameters, and "
                "training steps. Wall time is that of the last training session (a resumed run "
                "restarts it).")
        + note
    )


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


def floor_row(floor: dict) -> list[str]:
    """Table 1's reference row: real slices of another split, FID and KID columns only."""
    cells = [td(esc(f"real {floor.get('split', '?')} slices (floor)"), classes=["name"]),
             td("real"), td(""), td(esc(f"{floor.get('slices', '?')} slices"))]
    for _, keys, decimals, _ in TABLE1:
        if keys[0] == "fid" and keys[1].startswith("fid_"):
            cells.append(estimate_cell(floor.get("fid"), decimals))
        elif keys[0] == "fid" and keys[1].startswith("kid_"):
            cells.append(estimate_cell(floor.get("kid"), decimals))
        else:
            cells.append(td(""))
    return cells


def metric_cell(run: Run, keys: Sequence[str], decimals: int, best: bool) -> str:
    present, entry = dig(run.metrics, keys)
    if not present:
        return td(missing(run.command("evaluate")), classes=["text"])
    return estimate_cell(entry, decimals, best)


def estimate_cell(entry: Any, decimals: int, best: bool = False) -> str:
    """A stored estimate (a dict with mean and interval) or a plain number, as a cell."""
    if entry is None:
        return td(absent("absent"))
    if isinstance(entry, dict):
        mean = entry.get("mean")
        text = with_interval(mean, entry.get("ci_low"), entry.get("ci_high"), decimals)
    else:
        mean, text = entry, number(entry, decimals)
    return td(text, mean, ["best"] if best else [])


def metric_mean(run: Run, keys: Sequence[str]) -> Any:
    entry = dig(run.metrics, keys)[1]
    return entry.get("mean") if isinstance(entry, dict) else entry


def table1_section(runs: Sequence[Run]) -> str:
    best = {keys: best_rows([metric_mean(r, keys) for r in runs], better)
            for _, keys, _, better in TABLE1}
    rows = []
    for i, run in enumerate(runs):
        cells = [name_cell(run), td(esc(run.model("kind", "?")))]
        if run.metrics is None:
            cells.append(td(missing(run.command("evaluate")), colspan=len(TABLE1) + 2))
        else:
            s = dig(run.metrics, ("nll", "iw_samples"))[1]
            split = run.metrics.get("split", "?")
            cells += [td(esc(s), s),
                      td(esc(f"{split} ({run.metrics.get('slices', '?')} slices, "
                             f"{run.metrics.get('subjects', '?')} subjects)"))]
            cells += [metric_cell(run, keys, decimals, i in best[keys])
                      for _, keys, decimals, _ in TABLE1]
        rows.append(cells)
    floor = next((f for r in runs if (f := dig(r.metrics, ("fid", "floor"))[1])), None)
    if floor:
        rows.append(floor_row(floor))
    header = ["run", "kind", "S", "split", *(esc(h) for h, *_ in TABLE1)]
    methods = sorted({str(dig(r.metrics, ("nll", "nats_per_slice", "ci_method"))[1])
                      for r in runs if r.metrics is not None} - {"None"})
    caption = (
        "Table 1 analogue: reconstruction quality on the test split, each as mean [95% CI]; best "
        "per column marked &#9733; (lower NLL and FID, higher PSNR and SSIM). NLL is the "
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
        f"({esc(fid_sizes(runs))}: FID is biased, it falls as N grows, so compare it at equal N "
        "only; KID is not biased and carries the spread over subsets), and the floor: another "
        "split's real slices against the same inputs, what a perfect model would score; "
        "brain-like: the fraction of prior samples at temperature T "
        "that pass the brain-shape test (Wilson interval), and of the real test slices (the "
        "reference); shape diversity: mean pairwise 1 - Dice of their brain outlines (0: one "
        "shape drawn again and again; nearer the real slices' value is better); 2nd stage: the "
        "same for draws of the second-stage prior, a Gaussian mixture fitted after training to "
        "the training posteriors' residuals of every group and decoded top-down "
        "(models.second_stage), at the same N as the prior samples; copy ratio: the draws' "
        "median distance to their nearest training reconstruction over that of the test "
        "reconstructions (1: as new as unseen slices, 0: copies of training slices), near "
        "copies: the fraction of draws nearer than 5% of the test reconstructions are (0.05 "
        "for new slices; evaluation.novelty)."
    )
    note = f'<p class="note">Intervals: {esc("; ".join(methods))}.</p>' if methods else ""
    return "<h2>Reconstruction (Table 1)</h2>\n" + table(header, rows, caption) + note


def r2_table(runs: Sequence[Run], unit: str) -> str:
    groups = group_order(g for r in runs for g in dig(r.analysis, ("table4", unit, "r2"))[1] or {})
    rows, targets = [], set()
    for run in runs:
        cells = [name_cell(run)]
        present, entry = dig(run.analysis, ("table4", unit))
        if run.analysis is None:
            cells.append(td(missing(run.command(ANALYZE)), colspan=max(len(groups), 1)))
        elif not present:
            cells.append(td(absent(f"no {unit}-level R² in analysis.json"),
                            colspan=max(len(groups), 1)))
        else:
            targets.add(str(entry.get("target")))
            z_p = f"z{run.model('z_p')}" if run.model("supervised") else None
            for group in groups:
                value = (entry.get("r2") or {}).get(group)
                low, high = ((entry.get("r2_ci") or {}).get(group) or (None, None))
                text = with_interval(value, low, high, 2) if low is not None else number(value, 3)
                classes = ["zp"] if group == z_p else []
                if finite(value) and value < 0:  # worse than predicting the mean: no shade
                    cells.append(td(text, value, [*classes, "negative"]))
                else:
                    cells.append(td(text, value, classes, colour(value, 0.0, 1.0)))
        rows.append(cells)
    level = "subject level, the paper's analogue" if unit == "subject" else "slice level"
    caption = (
        f"Lasso test R² per latent group ({level}) against {esc(', '.join(sorted(targets)))}; "
        "cells shaded from 0 (white) to 1 (dark green), negative R² in grey; a supervised run's "
        "z<sub>P</sub> is outlined in red. Brackets: 95% bootstrap interval over the test "
        "subjects (the test set's sampling error; analyses from before it have none)."
    )
    return table(["run", *map(esc, groups)], rows, caption)


def table4_section(runs: Sequence[Run]) -> str:
    return ("<h2>Latent informativeness (Table 4)</h2>\n" + r2_table(runs, "subject") + "\n"
            + r2_table(runs, "slice"))


def sensitivity_section(runs: Sequence[Run]) -> str:
    ratios = [dig(r.analysis, ("sensitivity", "ratio"))[1] or {} for r in runs]
    groups = group_order(g for ratio in ratios for g in ratio)
    high = max((v for ratio in ratios for v in ratio.values() if finite(v)), default=1.0)
    rows, regions = [], set()
    for run, ratio in zip(runs, ratios, strict=True):
        cells = [name_cell(run)]
        present, entry = dig(run.analysis, ("sensitivity",))
        if run.analysis is None:
            cells.append(td(missing(run.command(ANALYZE)), colspan=len(groups) + 2))
        elif not present:
            cells.append(td(absent("no sensitivity in analysis.json (no pathology examples)"),
                            colspan=len(groups) + 2))
        else:
            regions.add(str(entry.get("regions")))
            posthoc = entry.get("z_p_posthoc")
            cells += [td(number(ratio.get(g), 2), ratio.get(g),
                         ["best"] if g == posthoc else [], colour(ratio.get(g), 0.0, high,
                                                                    "Oranges"))
                      for g in groups]
            cells.append(td(esc(posthoc) if posthoc is not None else "n/a"))
            z_p = run.model("z_p")
            configured = f"z{z_p}" if z_p is not None else "?"
            cells.append(td(esc(configured + (" (supervised)" if run.model("supervised") else ""))))
        rows.append(cells)
    caption = (
        "Pathology sensitivity (Fig. 6c analogue): each group's code scaled by a set of factors "
        "and decoded; the ratio is the summed change inside the pathology region over that in the "
        f"reference region ({esc(', '.join(sorted(regions)) or 'n/a')}). The group with the "
        "highest ratio (marked &#9733;) is the post-hoc z<sub>P</sub>; shading from 0 to the "
        "largest ratio in the table."
    )
    header = ["run", *map(esc, groups), "post-hoc z<sub>P</sub>", "configured z<sub>P</sub>"]
    return "<h2>Pathology sensitivity</h2>\n" + table(header, rows, caption)


def dci_section(runs: Sequence[Run]) -> str:
    rows, settings = [], set()
    for run in runs:
        cells = [name_cell(run)]
        present, entry = dig(run.analysis, ("dci",))
        if run.analysis is None:
            cells.append(td(missing(run.command(ANALYZE)), colspan=len(DCI_COLUMNS) + 1))
        elif not present:
            cells.append(td(absent("no DCI in analysis.json"), colspan=len(DCI_COLUMNS) + 1))
        else:
            settings.add(f"{entry.get('unit')} level, {entry.get('method')} importances, "
                         f"alpha {entry.get('alpha')}")
            cells += [td(number(entry.get(key), 3), entry.get(key)) for _, key in DCI_COLUMNS]
            cells.append(td(esc(len(entry.get("factors") or []))))
        rows.append(cells)
    caption = (
        "DCI of the posterior-mean codes against the phantom's generating factors: "
        "disentanglement D and completeness C per latent group and per code unit (0-1, higher is "
        "better), and informativeness as the mean test R² over factors "
        f"({esc('; '.join(sorted(settings)) or 'n/a')})."
    )
    header = ["run", *(esc(h) for h, _ in DCI_COLUMNS), "factors"]
    return "<h2>Disentanglement (DCI)</h2>\n" + table(header, rows, caption)


def rate_cell(rates: Any, best: bool = False) -> str:
    if not isinstance(rates, dict):
        return td(absent("absent"))
    value = rates.get("invalid_fraction")
    text = with_interval(value, rates.get("ci_low"), rates.get("ci_high"), 4)
    return td(text, value, ["best"] if best else [])


def detection_section(runs: Sequence[Run]) -> str:
    """Pseudo-healthy lesion detection against its baselines, one row per run and score."""
    rows = []
    for run in runs:
        found = run.counterfactual
        if found is None:
            text = (absent("not applicable: lesion detection is defined for MS cohorts")
                    if validity_not_applicable(run) else missing(run.command("counterfactual")))
            rows.append([name_cell(run), td(text, colspan=8)])
            continue
        groups = ", ".join(f"z{g}" for g in found.get("pathology_groups") or [])
        if found.get("not_scored"):
            rows.append([name_cell(run), td(absent(f"not scored: {found['not_scored']}"),
                                            colspan=8)])
        for score, row in (found.get("detection") or {}).items():
            rows.append([
                name_cell(run), td(esc(found.get("model", run.model("kind", "?")))),
                td(esc(groups)), td(esc(score), classes=["name"]),
                estimate_cell(row.get("auprc"), 3), estimate_cell(row.get("dice"), 3),
                estimate_cell(row.get("best_dice"), 3),
                estimate_cell(row.get("load_correlation"), 3),
                td(esc(row.get("n_subjects")), row.get("n_subjects")),
            ])
    return "<h2>Lesion detection by pseudo-healthy reconstruction</h2>\n" + table(
        ["run", "kind", "pathology groups", "score", "AUPRC", "Dice (val threshold)",
         "best Dice (optimistic)", "lesion-load r", "test subjects"], rows,
        "Voxel-level detection of the phantom's lesions inside the brain on the test split, mean "
        "[95% subject-bootstrap CI]. Scores: the positive residual of the slice against its "
        "pseudo-healthy reconstruction (pathology groups at their prior mean given the groups "
        "above), the positive residual of the plain reconstruction, and the intensity itself. "
        "Dice uses the threshold that maximised Dice on the validation split; best Dice fits it "
        "on the test split (optimistic); lesion-load r correlates each subject's detected and "
        "true lesion voxels. Read it as: pseudo-healthy reconstruction helps where its AUPRC "
        "interval lies above both baselines'.")


def edit_rows(runs: Sequence[Run], width: int, cells: Callable[[dict], list[str]]
              ) -> list[list[str]]:
    """One row per run: its kind, pathology groups and ``cells`` of its counterfactual.json, or
    why there are none."""
    rows = []
    for run in runs:
        found = run.counterfactual
        if found is None or not found.get("swap"):
            text = (absent("not applicable: edits are scored on MS cohorts")
                    if validity_not_applicable(run)
                    else absent(f"not scored: {found['not_scored']}")
                    if found and found.get("not_scored")
                    else missing(run.command("counterfactual")))
            rows.append([name_cell(run), td(text, colspan=width)])
            continue
        groups = ", ".join(f"z{g}" for g in found.get("pathology_groups") or [])
        rows.append([name_cell(run), td(esc(found.get("model", run.model("kind", "?")))),
                     td(esc(groups)), *cells(found)])
    return rows


def swap_cells(found: dict) -> list[str]:
    """A run's cells of the scored swap (its counterfactual record ``found``)."""
    swap = found["swap"]
    effect, anatomy = swap["effectiveness"], swap["anatomy"]
    factors = anatomy.get("factors") or {}
    return [
        td(esc(swap["pairs"]), swap["pairs"]),
        estimate_cell(effect["area_correlation"], 3),
        estimate_cell(effect["reference_a_reconstruction"]["area_correlation"], 3),
        estimate_cell(effect["lesion_dice_where_allowed"], 3),
        estimate_cell(swap["minimality"], 3),
        estimate_cell(anatomy["tissue_dice"]["WM"], 3),
        estimate_cell(anatomy["reference_b_reconstruction"]["WM"], 3),
        estimate_cell((factors.get("mix") or {}).get("mean_r2_held"), 3),
        estimate_cell((factors.get("b") or {}).get("mean_r2_held"), 3),
    ]

def soundness_cells(found: dict) -> list[str]:
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


def swap_section(runs: Sequence[Run]) -> str:
    """The scored pathology swap and the edits' soundness, one row per run."""
    swap_table = table(
        ["run", "kind", "pathology groups", "pairs", "lesion area r", "(a's reconstruction)",
         "Dice where b allows", "minimality", "WM Dice", "(b's reconstruction)",
         "factor R² from mix z_A", "(from b's z_A)"],
        edit_rows(runs, 11, swap_cells),
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
    soundness_table = table(
        ["run", "kind", "pathology groups", "swapped back: PSNR (dB)", "null edit x1: PSNR",
         "null edit x10: PSNR", "x10 lesion-area drift (mm²)", "z_P redraw: area spread (mm²)",
         "redrawn lesions in valid tissue", "redraw WM Dice"],
        edit_rows(runs, 9, soundness_cells),
        "Reversibility: P(b) + A(mix) against b's reconstruction. Composition: the null edit "
        "(encode, decode) applied to a slice's first reconstruction once and 10 times, against "
        "that reconstruction. Conditional synthesis: a slice's anatomy groups kept and its "
        "pathology groups redrawn from the prior (T = 1) several times: the spread of the "
        "segmented lesion areas, the fraction of their voxels in the slice's true GM, WM or "
        "hippocampus, and the WM Dice against its true labels. Read it as: sound edits keep "
        "PSNR high and drift near 0; a pathology code that varies lesions puts them in valid "
        "tissue while the anatomy holds.")
    return ("<h2>Pathology swap, scored</h2>\n" + swap_table
            + "<h2>Soundness of the edits</h2>\n" + soundness_table)


def validity_not_applicable(run: Run) -> bool:
    return dig(run.analysis, ("pathology",))[1] == "ad"


def validity_rate_row(run: Run, v: dict, best: bool) -> list[str]:
    """One run's row of the invalid-lesion rates."""
    samples = v.get("samples") or {}
    return [
        name_cell(run), td(esc(v.get("model", run.model("kind", "?")))),
        rate_cell(samples, best), td(esc(samples.get("n")), samples.get("n")),
        estimate_cell(v.get("brain_like"), 3),
        rate_cell(dig(v, ("second_stage", "samples"))[1]),
        rate_cell(v.get("reconstructions")), rate_cell(v.get("real")),
        rate_cell(v.get("truth")),
        td(esc(f"{v.get('temperature')}")),
    ]


def validity_section(runs: Sequence[Run]) -> str:
    sample_rates = [dig(r.validity, ("samples", "invalid_fraction"))[1] for r in runs]
    best = best_rows(sample_rates, "min")
    rate_rows, seg_rows, label_rows = [], [], []
    tissue = list(dict.fromkeys(
        k for r in runs for k in dig(r.validity, ("segmenters", "tissue_dice"))[1] or {}))
    labels = list(dict.fromkeys(
        k for r in runs for src in ("samples", "real", "truth")
        for k in dig(r.validity, (src, "per_label"))[1] or {}))
    definitions = set()
    for i, run in enumerate(runs):
        v = run.validity
        if v is None:
            text = (absent("not applicable: sample validity is defined for MS cohorts")
                    if validity_not_applicable(run) else missing(run.command(VALIDITY)))
            rate_rows.append([name_cell(run), td(text, colspan=9)])
            seg_rows.append([name_cell(run), td(text, colspan=3 + len(tissue))])
            label_rows.append([name_cell(run), td(text, colspan=1 + len(labels))])
            continue
        definitions.add(str(v.get("definition")))
        rate_rows.append(validity_rate_row(run, v, i in best))
        seg = v.get("segmenters") or {}
        dice = seg.get("tissue_dice") or {}
        seg_rows.append([name_cell(run)] + [
            td(number(seg.get(k), 3), seg.get(k))
            for k in ("lesion_dice", "lesion_precision", "lesion_recall")
        ] + [td(number(dice.get(t), 3), dice.get(t)) for t in tissue])
        for source in ("samples", "real", "truth"):
            shares = dig(v, (source, "per_label"))[1] or {}
            label_rows.append([name_cell(run), td(source, classes=["name"])] + [
                td(number(shares.get(t), 3), shares.get(t)) for t in labels])
    parts = ["<h2>Sample validity</h2>"]
    parts += [f'<p class="note">Definition: {esc(d)}</p>' for d in sorted(definitions)]
    parts.append(table(
        ["run", "kind", "samples", "samples (n)", "brain-like", "2nd-stage samples",
         "reconstructions", "real test slices", "ground truth", "temperature"], rate_rows,
        "Fraction of lesion-like voxels in anatomically invalid places, mean [95% bootstrap CI "
        "over slices]: the model's prior samples, the second-stage prior's draws, the model's "
        "reconstructions of the test slices (the floor for decoded images), the real test slices "
        "segmented the same way (the reference rate), and the ground-truth masks on the "
        "ground-truth tissue labels (0 by construction). "
        "Samples are counted only when they pass the brain-shape test; brain-like gives the "
        "fraction that did (n counts them). "
        "Lowest sample rate marked &#9733;."))
    if any(r.validity is not None for r in runs):
        parts.append(table(
            ["run", "lesion Dice", "lesion precision", "lesion recall",
             *(f"Dice {esc(t)}" for t in tissue)], seg_rows,
            "Accuracy of the segmenters (trained on the phantom's ground truth, scored on its "
            "held-out test split) that judge the samples."))
    if labels:
        parts.append(table(
            ["run", "source", *map(esc, labels)], label_rows,
            "Where lesion-like voxels fall: the share on each tissue label."))
    return "\n".join(parts)


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


def curves_missing(run: Run) -> str:
    if run.summary is not None:  # trained: resuming would not bring the curves back
        return absent("metrics.csv is missing; curves are logged only while a run trains, so "
                      "these cannot be drawn again")
    return missing(run.command(TRAIN))


def curves_section(runs: Sequence[Run]) -> str:
    parts = ["<h2>Training curves</h2>"]
    parts += [f"<p>{esc(r.name)}: {curves_missing(r)}</p>" for r in runs if r.curves is None]
    figures = []
    for column, title, ylabel in CURVES:
        content = curve_figure(runs, column, title, ylabel)
        if content is not None:
            what = f"{column}*" if column.endswith("_") else column
            figures.append(figure_html(
                content, f"{title} ({ylabel}) against training step, one line per run "
                f"(metrics.csv column {what}; a step logged twice keeps its later row).", title,
                "panels" if column.endswith("_") else "curve"))
    if not figures and all(r.curves is None for r in runs):
        return "\n".join(parts)
    if not figures:
        parts.append(f"<p>{absent('metrics.csv holds none of the plotted metrics')}</p>")
    parts.append('<div class="curves">' + "\n".join(figures) + "</div>")
    return "\n".join(parts)


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


def run_figures_section(run: Run) -> str:
    folder = run.path / "figures"
    pngs = {p.stem: p for p in sorted(folder.glob("*.png"))} if folder.is_dir() else {}
    known = expected_figures(run)
    order = [stem for stem, _ in known] + [s for s in pngs if s not in dict(known)]
    commands = dict(known)
    parts = [f"<h3>{esc(run.name)}</h3>"]
    if run.synthesis is not None:
        groups = run.synthesis.get("pathology_groups") or []
        parts.append(
            f'<p class="note">Synthesis: pathology groups '
            f"{esc(', '.join(f'z{g}' for g in groups) or 'none')} "
            f"(from {esc(run.synthesis.get('pathology_source', '?'))}), "
            f"seed {esc(run.synthesis.get('seed', '?'))}.</p>")
    for stem in order:
        if stem not in pngs:
            trained = run.summary is not None and commands[stem] == run.command(TRAIN)
            text = (absent("missing; it is drawn only while the run trains") if trained
                    else missing(commands[stem]))
            parts.append(f"<p>{esc(stem)}.png: {text}</p>")
            continue
        content = pngs[stem].read_bytes()
        if not content.startswith(PNG_SIGNATURE):
            parts.append(f"<p>{esc(pngs[stem].name)}: {absent('not a PNG file')}</p>")
            continue
        parts.append(figure_html(content, figure_caption(pngs[stem]), f"{run.name}: {stem}",
                                 file=f"figures/{pngs[stem].name}"))
    return "\n".join(parts)


# ---- the page -----------------------------------------------------------------------------------


def claims_section(claims: Sequence[dict]) -> str:
    """The paper's claims as checked on these runs (``evaluation.claims``), verdict and numbers."""
    rows = [[td(esc(c["source"])), td(esc(c["claim"])), td(esc(verdict_text(c))),
             td(esc(c["evidence"]))] for c in claims]
    caption = ("Each claim compares point estimates across the runs; the numbers behind it are "
               "beside, with 95% intervals where the metric has them, so a difference inside the "
               "noise is visible. Over several training seeds a claim is checked on each seed's "
               "grid and holds when it holds in every seed (a sign test: a coin-flip claim is "
               "unanimous over N seeds with probability 2^(1-N)).")
    return "<h2>The paper's claims on these runs</h2>\n" + table(
        ["source", "claim", "verdict", "evidence"], rows, caption)


# The numbers shown over training seeds: (header, Run attribute, keys, decimals); "z_P" in keys
# stands for the run's configured pathology group.
SEED_COLUMNS = (
    ("PSNR (dB)", "metrics", ("reconstruction", "psnr", "mean"), 2),
    ("NLL (bits/dim)", "metrics", ("nll", "bits_per_dim", "mean"), 4),
    ("FID recon.", "metrics", ("fid", "fid_reconstruction"), 1),
    ("FID 2nd-stage samples", "metrics", ("fid", "fid_samples_second_stage"), 1),
    ("KID 2nd-stage samples", "metrics", ("fid", "kid_samples_second_stage", "mean"), 4),
    ("brain-like T=1", "metrics", ("plausibility", "samples", "1.0", "brain_like", "mean"), 3),
    ("brain-like 2nd stage", "metrics", ("plausibility", "second_stage", "brain_like", "mean"),
     3),
    ("copy ratio 2nd stage", "metrics", ("novelty", "second_stage", "distance_ratio"), 2),
    ("R² of z_P, subject", "analysis", ("table4", "subject", "r2", "z_P"), 3),
    ("R² of z_P, slice", "analysis", ("table4", "slice", "r2", "z_P"), 3),
    ("invalid lesion fraction, samples", "validity", ("samples", "invalid_fraction"), 3),
)


def seed_value(run: Run, source: str, keys: Sequence[str]) -> Any:
    z_p = f"z{run.model('z_p')}"
    value = dig(getattr(run, source), [z_p if k == "z_P" else k for k in keys])[1]
    return value.get("mean") if isinstance(value, dict) else value


def seeds_section(replicates: Mapping[str, Sequence[Run]]) -> str:
    """Each grid run's numbers over its training seeds: mean ± standard deviation (n - 1) and
    the per-seed values, so a reader sees which differences between runs exceed the seeds'."""
    rows = []
    for name, runs in replicates.items():
        cells = [td(esc(name), classes=["name"]), td(str(len(runs)), len(runs))]
        for _, source, keys, decimals in SEED_COLUMNS:
            values = [seed_value(r, source, keys) for r in runs]
            present = np.array([v for v in values if finite(v)], dtype=float)
            if len(present) == 0:
                cells.append(td(absent("n/a")))
                continue
            spread = float(present.std(ddof=1)) if len(present) > 1 else float("nan")
            each = ", ".join(number(v, decimals) for v in values)
            cells.append(td(f'{number(float(present.mean()), decimals)} &plusmn; '
                            f'{number(spread, decimals)} <span class="ci">{each}</span>',
                            float(present.mean())))
        rows.append(cells)
    caption = (
        "Each run of the grid trained with several seeds (seed s in NAME_seedS; the tables "
        "above show seed 0): mean &plusmn; standard deviation over seeds, then each seed's "
        "value in seed order (n/a where a seed lacks it). A difference between two runs that is "
        "smaller than their seeds' spread is not an ordering."
    )
    header = ["run", "seeds", *(esc(h) for h, *_ in SEED_COLUMNS)]
    return "<h2>Spread over training seeds</h2>\n" + table(header, rows, caption)


def report_html(runs: Sequence[Run], title: str, claims: Sequence[dict] | None = None,
                replicates: Mapping[str, Sequence[Run]] | None = None) -> str:
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        overview_section(runs),
        *([claims_section(claims)] if claims else []),
        *([seeds_section(replicates)] if replicates else []),
        table1_section(runs),
        table4_section(runs),
        sensitivity_section(runs),
        dci_section(runs),
        validity_section(runs),
        detection_section(runs),
        swap_section(runs),
        curves_section(runs),
        "<h2>Figures</h2>\n" + "\n".join(run_figures_section(r) for r in runs),
    ]
    # the sections are still built as HTML by the functions above (the next step makes them data)
    return page_template().render(title=title, generated=generated, run_count=len(runs),
                                  sections=[markupsafe.Markup(s) for s in sections])


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
) -> Path:
    """Write one self-contained HTML report comparing the run folders ``runs`` to ``out``;
    ``claims`` (from ``evaluation.claims.check_claims``) adds a section of verdicts;
    ``replicates`` (name -> the run folders of its training seeds) one of spread over seeds.

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
        tmp.write_text(report_html(loaded, title, claims, seeds), encoding="utf-8")
        # the temporary file is private (mkstemp); a report is for sharing: the usual mode
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
    return out
