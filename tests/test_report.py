"""`pathanat report`: the HTML holds exactly the numbers of the run files, says what is missing,
escapes what it reads, embeds its images, and renders in headless Chromium without errors."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import itertools
import json
import os
import select
import shutil
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import yaml

from pathanat.errors import InputError, PathanatError
from pathanat.evaluation.report import (
    BUILTIN_CAPTIONS,
    curve_series,
    default_report_path,
    read_run,
    report_page,
    write_report,
)
from pathanat.runs import load_checkpoint

GROUPS = ["z0", "z1", "z2", "z3", "z4"]


# ---- parsing the page ---------------------------------------------------------------------------


class Page(HTMLParser):
    """Tables (rows of (text, attributes) cells), images and text of an HTML page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[dict] = []
        self.images: list[dict] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self._caption: list[str] | None = None  # a table's caption: the <p> above it
        self._pending = ""
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"caption": self._pending, "rows": []})
            self._pending = ""
        elif tag == "p" and attrs.get("class") == "caption":
            self._caption = []
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = []
            self.tables[-1]["rows"][-1].append(("", attrs))
        elif tag == "img":
            self.images.append(attrs)

    def handle_endtag(self, tag):
        if tag == "p" and self._caption is not None:
            self._pending = "".join(self._caption).strip()
            self._caption = None
        elif tag in ("td", "th") and self._cell is not None:
            row = self.tables[-1]["rows"][-1]
            row[-1] = ("".join(self._cell).strip(), row[-1][1])
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._caption is not None:
            self._caption.append(data)

    def table(self, caption_start: str) -> list[list[tuple[str, dict]]]:
        found = [t for t in self.tables if t["caption"].startswith(caption_start)]
        assert len(found) == 1, f"expected one table captioned {caption_start!r}"
        return found[0]["rows"]

    def row(self, caption_start: str, run: str) -> list[tuple[str, dict]]:
        rows = [r for r in self.table(caption_start) if r[0][0] == run]
        assert len(rows) == 1, f"expected one row for {run!r}"
        return rows[0]

    def all_text(self) -> str:
        return " ".join("".join(self.text).split())


def header(rows) -> list[str]:
    return [text for text, _ in rows[0]]


def cell(rows, run: str, column: str) -> tuple[str, dict]:
    names = header(rows)
    matches = [r for r in rows[1:] if r[0][0] == run]
    assert len(matches) == 1
    return matches[0][names.index(column)]


# ---- run folders with known content -------------------------------------------------------------


def ci(mean, low, high):
    return {"mean": mean, "ci_low": low, "ci_high": high, "n_slices": 40, "n_subjects": 4,
            "ci_method": "subject bootstrap (4000 resamples)"}


def rates(fraction, low, high, n, per_label):
    return {"n": n, "lesion_voxels": 1000, "invalid_voxels": round(1000 * (fraction or 0)),
            "invalid_fraction": fraction, "ci_low": low, "ci_high": high, "per_label": per_label}


def write_png(path: Path, seed: int, caption: str | None = None) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, np.random.default_rng(seed).random((12, 16)), cmap="gray")
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n")
    return path.read_bytes()


def make_run(folder: Path, kind: str, seed: int, supervised: bool = False) -> dict:
    """A complete run folder whose numbers are drawn from ``seed``; returns what it wrote."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    config = {"data": {"cache": "/data/cache"},
              "model": {"kind": kind, "image_size": [48, 48], "width": 8, "cells_per_scale": 1,
                        "pseudo_inputs": 4, "z_p": 2, "supervised": supervised}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {"steps": int(rng.integers(100, 1000)), "skipped_steps": int(rng.integers(0, 5)),
               "wall_s_this_session": float(rng.uniform(10, 99))}
    (folder / "summary.json").write_text(json.dumps(summary))

    def interval(mean, spread):
        return ci(mean, mean - spread, mean + spread)

    metrics = {
        "split": "test", "slices": 40, "subjects": 4,
        "nll": {"iw_samples": 8, "bins": {"low": -4.0, "high": 4.0, "levels": 256},
                "nats_per_slice": interval(rng.uniform(9000, 30000), 50.0),
                "bits_per_dim": interval(rng.uniform(1, 5), 0.01),
                "continuous": {"bits_per_dim": interval(rng.uniform(-0.5, 0.5), 0.01)},
                "regions": {"brain": interval(rng.uniform(3, 6), 0.01),
                            "background": interval(rng.uniform(0.1, 1), 0.01)},
                "convergence": {"move": float(rng.uniform(0, 90)), "converged": True}},
        "reconstruction": {name: interval(rng.uniform(lo, hi), 0.01)
                           for name, lo, hi in (("psnr", 20, 30), ("ssim", 0.5, 0.9),
                                                ("psnr_brain", 20, 30),
                                                ("ssim_brain", 0.5, 0.9))},
        "fid": {"fid_reconstruction": float(rng.uniform(0, 1)),
                "fid_samples": float(rng.uniform(0, 1)),
                "kid_reconstruction": interval(rng.uniform(0, 0.1), 0.001),
                "kid_samples": interval(rng.uniform(0, 0.1), 0.001),
                "fid_samples_second_stage": float(rng.uniform(0, 1)),
                "kid_samples_second_stage": interval(rng.uniform(0, 0.1), 0.001),
                "second_stage_detail_steps": int(rng.choice([0, 8000])),
                "samples": 2048, "inputs": 40,
                "floor": {"split": "val", "slices": 36, "fid": 0.011,
                          "kid": interval(0.0004, 0.0001)}},
        "novelty": {w: {"distance_ratio": float(rng.uniform(0.5, 1)),
                        "near_copies": float(rng.uniform(0, 0.2))}
                    for w in ("samples", "second_stage")},
        "plausibility": {
            "real": {"brain_like": interval(1.0 - rng.uniform(0, 0.02), 0.001), "n": 40,
                     "shape_diversity": 0.06},
            "samples": {t: {"brain_like": interval(rng.uniform(0.1, 0.9), 0.05), "n": 256,
                            "shape_diversity": 0.05} for t in ("0.6", "0.8", "1.0")},
            "second_stage": {"brain_like": interval(rng.uniform(0.1, 0.9), 0.05), "n": 256,
                             "shape_diversity": 0.055},
        },
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    ratio = dict(zip(GROUPS, rng.uniform(0.5, 3.5, 5).tolist(), strict=True))
    table4 = {unit: {"target": target, "r2": dict(zip(GROUPS, rng.uniform(-1.5, 1, 5).tolist(),
                                                     strict=True))}
              for unit, target in (("subject", "lesion_volume_mm3"), ("slice", "lesion_area_mm2"))}
    if supervised:  # an analysis with R^2 intervals; the other run's predates them
        for entry in table4.values():
            entry["r2_ci"] = {g: [v - 0.25, v + 0.125] for g, v in entry["r2"].items()}
    analysis = {
        "pathology": "ms",
        "table4": table4,
        "dci": {"unit": "slice", "method": "lasso", "alpha": 0.05, "factors": ["a", "b", "c"],
                **{k: float(rng.uniform(0, 1)) for k in
                   ("disentanglement_groups", "completeness_groups", "disentanglement_codes",
                    "completeness_codes", "informativeness_r2_mean")}},
        "sensitivity": {"regions": "lesion vs healthy brain", "ratio": ratio,
                        "z_p_posthoc": max(ratio, key=ratio.get)},
    }
    (folder / "analysis.json").write_text(json.dumps(analysis))
    labels = ["background", "CSF", "ventricles", "GM", "WM", "hippocampus"]

    def shares():
        return dict(zip(labels, rng.dirichlet(np.ones(6)).tolist(), strict=True))

    validity = {
        "run": str(folder), "model": kind, "split": "test", "seed": 0, "temperature": 1.0,
        "definition": "A voxel is lesion-like when the lesion segmenter's probability > 0.5; "
                      "invalid when the tissue segmenter calls it background, CSF or ventricles.",
        "invalid_labels": ["background", "CSF", "ventricles"],
        "samples": rates(float(rng.uniform(0.1, 0.5)), 0.05, 0.6, 64, shares()),
        "real": rates(float(rng.uniform(0, 0.05)), 0.0, 0.06, 40, shares()),
        "reconstructions": rates(float(rng.uniform(0.03, 0.08)), 0.02, 0.09, 40, shares()),
        "second_stage": {"samples": rates(float(rng.uniform(0.1, 0.4)), 0.05, 0.5, 60,
                                          shares())},
        "truth": rates(0.0, 0.0, 0.0, 40, shares()),
        "segmenters": {"file": "/data/cache/segmenters/segmenters.pt", "split": "test",
                       "tissue_dice": dict(zip(labels, rng.uniform(0.5, 1, 6).tolist(),
                                               strict=True)),
                       "lesion_dice": float(rng.uniform(0.5, 1)),
                       "lesion_precision": float(rng.uniform(0.5, 1)),
                       "lesion_recall": float(rng.uniform(0.5, 1))},
    }
    (folder / "validity.json").write_text(json.dumps(validity))
    detection = None
    if supervised:  # the other run has no counterfactual.json: its row names the command
        detection = {"run": str(folder), "model": kind, "pathology_groups": [2],
                     "detection": {name: {"auprc": interval(rng.uniform(0.1, 0.9), 0.05),
                                          "dice": interval(rng.uniform(0.1, 0.9), 0.05),
                                          "best_dice": interval(rng.uniform(0.1, 0.9), 0.05),
                                          "load_correlation": interval(rng.uniform(0, 1), 0.1),
                                          "n_subjects": 12}
                                   for name in ("pseudo-healthy residual",
                                                "reconstruction residual", "intensity")}}
        detection.update(edit_records(rng))
        (folder / "counterfactual.json").write_text(json.dumps(detection))
    steps = np.arange(10, 110, 10)
    curves = pd.DataFrame({"step": steps, "train/loss": rng.uniform(1, 2, 10),
                           "kl/group_0": rng.uniform(1, 5, 10), "val/psnr": np.nan})
    curves.loc[9, "val/psnr"] = 24.0
    curves.to_csv(folder / "metrics.csv", index=False)
    figures = {
        "latent_r2": (write_png(folder / "figures" / "latent_r2.png", seed), None),
        "synth_prior": (write_png(folder / "figures" / "synth_prior.png", seed + 1,
                                  f"Prior samples of {kind} at temperatures 0.6, 0.8, 1.0."),
                        f"Prior samples of {kind} at temperatures 0.6, 0.8, 1.0."),
    }
    synthesis = {"run": str(folder), "model": kind, "pathology_groups": [2, 3],
                 "pathology_source": "flag", "seed": 7,
                 "figures": {"prior": "figures/synth_prior.png"}}
    (folder / "synthesis.json").write_text(json.dumps(synthesis))
    return {"summary": summary, "metrics": metrics, "analysis": analysis, "validity": validity,
            "detection": detection, "figures": figures}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[list[Path], list[dict], Page, Path]:
    root = tmp_path_factory.mktemp("report")
    runs = [root / "vae_ms", root / "nvmp_ms"]
    contents = [make_run(runs[0], "vae", 1), make_run(runs[1], "nvmp", 2, supervised=True)]
    out = write_report(runs, root / "report.html")
    return runs, contents, Page(out.read_text()), out


# ---- the numbers --------------------------------------------------------------------------------


def test_table1_holds_each_runs_means_and_intervals_and_marks_the_best(two_runs):
    runs, contents, page, _ = two_runs
    rows = page.table("Table 1 analogue")
    columns = {"NLL (nats/slice)": (("nll", "nats_per_slice"), 1, min),
               "NLL (bits/dim)": (("nll", "bits_per_dim"), 4, min),
               "bits/pixel brain": (("nll", "regions", "brain"), 3, min),
               "bits/pixel background": (("nll", "regions", "background"), 3, min),
               "PSNR (dB)": (("reconstruction", "psnr"), 2, max),
               "SSIM": (("reconstruction", "ssim"), 4, max),
               "PSNR brain (dB)": (("reconstruction", "psnr_brain"), 2, max),
               "SSIM brain": (("reconstruction", "ssim_brain"), 4, max),
               "KID samples": (("fid", "kid_samples"), 4, min),
               "brain-like T=0.8": (("plausibility", "samples", "0.8", "brain_like"), 3, max),
               "brain-like real": (("plausibility", "real", "brain_like"), 3, max)}
    for column, (keys, decimals, better) in columns.items():
        entries = []
        for content in contents:
            entry = content["metrics"]
            for key in keys:
                entry = entry[key]
            entries.append(entry)
        winner = entries.index(better(entries, key=lambda e: e["mean"]))
        for i, (run, entry) in enumerate(zip(runs, entries, strict=True)):
            text, attrs = cell(rows, run.name, column)
            assert float(attrs["data-value"]) == entry["mean"]
            assert text == (f"{entry['mean']:.{decimals}f} [{entry['ci_low']:.{decimals}f}, "
                            f"{entry['ci_high']:.{decimals}f}]")
            assert ("best" in attrs.get("class", "")) == (i == winner), column
    for column, name in (("FID recon.", "fid_reconstruction"), ("FID samples", "fid_samples")):
        values = [content["metrics"]["fid"][name] for content in contents]
        for i, run in enumerate(runs):
            text, attrs = cell(rows, run.name, column)
            assert float(attrs["data-value"]) == values[i] and text == f"{values[i]:.3f}"
            assert ("best" in attrs.get("class", "")) == (i == int(np.argmin(values)))
    assert cell(rows, runs[0].name, "S")[0] == "8"
    for run, content in zip(runs, contents, strict=True):  # which runs drew the detail
        steps = content["metrics"]["fid"]["second_stage_detail_steps"]
        assert cell(rows, run.name, "2nd-stage detail steps")[0] == str(steps)
    # the continuous NLL is shown, but no best is marked: it ranks background modelling
    for run, content in zip(runs, contents, strict=True):
        text, attrs = cell(rows, run.name, "continuous NLL (bits/dim)")
        assert float(attrs["data-value"]) == content["metrics"]["nll"]["continuous"][
            "bits_per_dim"]["mean"]
        assert "best" not in attrs.get("class", "")


def test_table1_has_the_real_slices_floor_and_states_the_fid_sizes(two_runs):
    _, contents, page, _ = two_runs
    rows = page.table("Table 1 analogue")
    floor = contents[0]["metrics"]["fid"]["floor"]
    name = "real val slices (floor)"
    assert cell(rows, name, "FID samples")[0] == f"{floor['fid']:.3f}"
    assert cell(rows, name, "FID recon.")[0] == f"{floor['fid']:.3f}"
    kid = floor["kid"]
    assert cell(rows, name, "KID samples")[0] == (
        f"{kid['mean']:.4f} [{kid['ci_low']:.4f}, {kid['ci_high']:.4f}]")
    assert cell(rows, name, "PSNR (dB)")[0] == ""
    assert "N = 40 inputs, 2048 prior draws" in page.all_text()


def test_an_evaluation_from_before_the_binned_nll_shows_as_continuous(tmp_path):
    run = tmp_path / "nvae"
    make_run(run, "nvae", 4)
    metrics = json.loads((run / "metrics.json").read_text())
    old = metrics["nll"]["bits_per_dim"]
    metrics["nll"] = {"iw_samples": 8, "nats_per_slice": metrics["nll"]["nats_per_slice"],
                      "bits_per_dim": old}  # the continuous NLL under the binned one's keys
    (run / "metrics.json").write_text(json.dumps(metrics))
    rows = Page(write_report([run], tmp_path / "r.html").read_text()).table("Table 1 analogue")
    attrs = cell(rows, run.name, "continuous NLL (bits/dim)")[1]
    assert float(attrs["data-value"]) == old["mean"]
    assert "not computed -- run pathanat evaluate" in cell(rows, run.name, "NLL (bits/dim)")[0]


def test_r2_grids_hold_every_group_at_both_levels(two_runs):
    runs, contents, page, _ = two_runs
    for unit, caption in (("subject", "Lasso test R² per latent group (subject level"),
                          ("slice", "Lasso test R² per latent group (slice level")):
        rows = page.table(caption)
        assert header(rows) == ["run", *GROUPS]
        for run, content in zip(runs, contents, strict=True):
            r2 = content["analysis"]["table4"][unit]["r2"]
            for group in GROUPS:
                text, attrs = cell(rows, run.name, group)
                v = r2[group]
                shown = f"{v:.2f} [{v - 0.25:.2f}, {v + 0.125:.2f}]" if run.name == "nvmp_ms" \
                    else f"{v:.3f}"
                assert float(attrs["data-value"]) == v and text == shown
                # the supervised run's z_P (z2) is outlined; the unsupervised run has none
                outlined = "zp" in attrs.get("class", "")
                assert outlined == (run.name == "nvmp_ms" and group == "z2")
                # shaded over [0, 1]; a negative R^2 (worse than the mean) is greyed, unshaded
                negative = "negative" in attrs.get("class", "")
                assert negative == (r2[group] < 0) and negative != ("background:" in
                                                                    attrs.get("style", ""))
        # the shade darkens as R^2 rises
        shades = sorted((content["analysis"]["table4"][unit]["r2"][g],
                         cell(rows, run.name, g)[1].get("style"))
                        for run, content in zip(runs, contents, strict=True) for g in GROUPS)
        brightness = [sum(int(s.split("#")[1][k:k + 2], 16) for k in (0, 2, 4))
                      for value, s in shades if value >= 0]
        assert len(brightness) >= 2
        assert all(a > b for a, b in itertools.pairwise(brightness))


def test_sensitivity_dci_and_validity_tables(two_runs):
    runs, contents, page, _ = two_runs
    sens = page.table("Pathology sensitivity")
    dci = page.table("DCI of the posterior-mean codes")
    rates_table = page.table("Fraction of lesion-like voxels")
    seg = page.table("Accuracy of the segmenters")
    shares = page.table("Where lesion-like voxels fall")
    sample_rates = [c["validity"]["samples"]["invalid_fraction"] for c in contents]
    for i, (run, content) in enumerate(zip(runs, contents, strict=True)):
        sensitivity = content["analysis"]["sensitivity"]
        for group, value in sensitivity["ratio"].items():
            text, attrs = cell(sens, run.name, group)
            assert float(attrs["data-value"]) == value and text == f"{value:.2f}"
            assert ("best" in attrs.get("class", "")) == (group == sensitivity["z_p_posthoc"])
        assert cell(sens, run.name, "post-hoc zP")[0] == sensitivity["z_p_posthoc"]
        for column, key in (("D (groups)", "disentanglement_groups"),
                            ("C (codes)", "completeness_codes"),
                            ("I: mean test R²", "informativeness_r2_mean")):
            text, attrs = cell(dci, run.name, column)
            value = content["analysis"]["dci"][key]
            assert float(attrs["data-value"]) == value and text == f"{value:.3f}"
        validity = content["validity"]
        for column, source in (("samples", "samples"), ("real test slices", "real"),
                               ("reconstructions", "reconstructions"),
                               ("2nd-stage samples", "second_stage"), ("ground truth", "truth")):
            text, attrs = cell(rates_table, run.name, column)
            r = validity[source]
            r = r["samples"] if source == "second_stage" else r
            assert float(attrs["data-value"]) == r["invalid_fraction"]
            assert text == (f"{r['invalid_fraction']:.4f} [{r['ci_low']:.4f}, "
                            f"{r['ci_high']:.4f}]")
            if source == "samples":
                assert ("best" in attrs.get("class", "")) == (i == int(np.argmin(sample_rates)))
        segmenters = validity["segmenters"]
        assert float(cell(seg, run.name, "lesion Dice")[1]["data-value"]) == \
            segmenters["lesion_dice"]
        assert float(cell(seg, run.name, "Dice ventricles")[1]["data-value"]) == \
            segmenters["tissue_dice"]["ventricles"]
        rows = [r for r in shares[1:] if r[0][0] == run.name and r[1][0] == "samples"]
        assert float(rows[0][header(shares).index("GM")][1]["data-value"]) == \
            validity["samples"]["per_label"]["GM"]


def test_lesion_detection_table_shows_each_score_or_the_command(two_runs):
    runs, contents, page, _ = two_runs
    rows = page.table("Voxel-level detection")
    names = header(rows)
    assert "not computed -- run pathanat counterfactual" in page.row(
        "Voxel-level detection", runs[0].name)[-1][0]
    found = [r for r in rows[1:] if r[0][0] == runs[1].name]
    detection = contents[1]["detection"]["detection"]
    assert [r[names.index("score")][0] for r in found] == list(detection)
    for r in found:
        entry = detection[r[names.index("score")][0]]
        for column, key in (("AUPRC", "auprc"), ("best Dice (optimistic)", "best_dice"),
                            ("lesion-load r", "load_correlation")):
            text, attrs = r[names.index(column)]
            assert float(attrs["data-value"]) == entry[key]["mean"]
            assert text.startswith(f"{entry[key]['mean']:.3f} [")
        assert r[names.index("pathology groups")][0] == "z2"


def edit_records(rng) -> dict:
    """Swap, composition and conditional records shaped as counterfactual_run writes them."""
    def est(low=0.0, high=1.0):
        mean = float(rng.uniform(low, high))
        return ci(mean, mean - 0.05, mean + 0.05)

    tissues = {t: est() for t in ("ventricles", "WM", "brain")}
    areas = {"area_correlation": est(), "area_mae_mm2": est(0, 200)}
    return {
        "swap": {"pairs": 200,
                 "effectiveness": {**areas, "lesion_dice_where_allowed": est(),
                                   "allowed_fraction": 0.98,
                                   "reference_a_reconstruction": dict(areas),
                                   "no_edit_b_reconstruction": dict(areas)},
                 "anatomy": {"tissue_dice": tissues, "reference_b_reconstruction": dict(tissues),
                             "factors": {"mix": {"mean_r2_held": est()},
                                         "b": {"mean_r2_held": est()}}},
                 "reversibility": {"psnr": est(20, 35), "ssim": est()},
                 "minimality": est()},
        "composition": {"slices": 32, **{k: {"psnr": est(20, 40), "ssim": est(),
                                             "lesion_area_drift_mm2": est(-50, 50),
                                             "lesion_area_abs_drift_mm2": est(0, 50)}
                                         for k in ("1", "10")}},
        "conditional": {"sources": 32, "draws": 8, "lesion_area_spread_mm2": est(0, 100),
                        "lesion_in_valid_tissue": est(), "tissue_dice": dict(tissues)},
    }


def test_seed_spread_has_the_fid_ratio_and_the_time_table_sums_the_stages(tmp_path):
    folders = []
    for seed, (recon, draws) in enumerate([(30.0, 60.0), (40.0, 100.0)]):  # ratios 2.0, 2.5
        folder = tmp_path / ("nvae_ms" if seed == 0 else f"nvae_ms_seed{seed}")
        make_run(folder, "nvae", seed)
        metrics = json.loads((folder / "metrics.json").read_text())
        metrics["fid"].update(fid_reconstruction=recon, fid_samples_second_stage=draws)
        (folder / "metrics.json").write_text(json.dumps(metrics))
        folders.append(folder)
    seconds = {"nvae_ms": {"train": 100.0, "evaluate": 50.0},
               "nvae_ms_seed1": {"evaluate": 40.0}}  # its training ran outside the record
    out = write_report([folders[0]], tmp_path / "report.html",
                       replicates={"nvae_ms": folders}, seconds=seconds)
    page = Page(out.read_text())
    spread = cell(page.table("Each run of the grid trained"), "nvae_ms",
                  "FID ratio 2nd stage / recon.")[0]
    assert spread == "2.25 ± 0.35 2.00, 2.50"  # standard deviation of (2, 2.5): 0.354
    times = page.table("Wall-clock seconds")
    assert header(times) == ["run folder", "train", "evaluate", "total"]
    assert cell(times, "nvae_ms", "total")[0] == "150"
    assert cell(times, "nvae_ms_seed1", "train")[0] == "n/a"
    assert cell(times, "nvae_ms_seed1", "total")[0] == "incomplete"
    assert [c[0] for c in times[-1]] == ["all runs (stages recorded)", "100", "90", "190"]


def test_swap_tables_show_each_run_s_edits_or_the_command(two_runs):
    runs, contents, page, _ = two_runs
    for caption in ("The mix P(a) + A(b)", "Reversibility: P(b) + A(mix)"):
        assert "not computed -- run pathanat counterfactual" in page.row(caption,
                                                                         runs[0].name)[-1][0]
    found = contents[1]["detection"]
    swap = page.table("The mix P(a) + A(b)")
    for column, entry in (("lesion area r", found["swap"]["effectiveness"]["area_correlation"]),
                          ("minimality", found["swap"]["minimality"]),
                          ("factor R² from mix z_A",
                           found["swap"]["anatomy"]["factors"]["mix"]["mean_r2_held"])):
        text, attrs = cell(swap, runs[1].name, column)
        assert float(attrs["data-value"]) == entry["mean"]
        assert text.startswith(f"{entry['mean']:.3f} [")
    sound = page.table("Reversibility: P(b) + A(mix)")
    text, attrs = cell(sound, runs[1].name, "null edit x10: PSNR")
    assert float(attrs["data-value"]) == found["composition"]["10"]["psnr"]["mean"]
    text, attrs = cell(sound, runs[1].name, "redrawn lesions in valid tissue")
    assert float(attrs["data-value"]) == found["conditional"]["lesion_in_valid_tissue"]["mean"]


def test_overview_and_figures(two_runs):
    runs, contents, page, _ = two_runs
    overview = page.table("Model kind")
    for run, content in zip(runs, contents, strict=True):
        assert cell(overview, run.name, "steps")[0] == str(content["summary"]["steps"])
        wall = content["summary"]["wall_s_this_session"]
        assert cell(overview, run.name, "wall time (s)")[0] == f"{wall:.1f}"
        assert int(cell(overview, run.name, "parameters")[1]["data-value"]) > 1000
    assert cell(overview, "nvmp_ms", "supervised")[0] == "yes"
    assert cell(overview, "nvmp_ms", "priors of z1..L")[0] == "learned"  # the config's default
    # every PNG of every run is embedded byte for byte with its caption (or the built-in one)
    sources = [base64.b64decode(img["src"].removeprefix("data:image/png;base64,"))
               for img in page.images if img["src"].startswith("data:image/png;base64,")]
    assert len(sources) == len(page.images)
    text = page.all_text()
    for content in contents:
        for png, caption in content["figures"].values():
            assert png in sources
            assert caption is None or caption in text
    assert BUILTIN_CAPTIONS["latent_r2"] in text
    assert "figures/synth_prior.png: Prior samples of vae" in text
    assert "Synthesis: pathology groups z2, z3 (from flag), seed 7." in text
    # the training curves are drawn by the report: one per metric present in metrics.csv
    curve_alts = [img["alt"] for img in page.images if ":" not in img["alt"]]
    assert curve_alts == ["Training loss", "Validation PSNR", "KL per latent group"]


def test_nothing_external_is_referenced(two_runs):
    *_, out = two_runs
    text = out.read_text()
    for needle in ("http://", "https://", "<script", "<link rel=\"stylesheet\"", "@import"):
        assert needle not in text


# ---- missing pieces, escaping, errors ----------------------------------------------------------


def test_missing_results_name_the_command_that_makes_them(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"kind": "nvmp"}}))
    page = Page(write_report([run], tmp_path / "r.html").read_text())
    text = page.all_text()
    for command in ("train --resume", "evaluate", "analyze", "validity",
                    "synthesize", "synthesize"):
        assert f"not computed -- run pathanat {command} {run}" in text
    for what in ("prior", "layers", "style-mix", "conditional", "clusters"):
        assert f"not computed -- run pathanat synthesize {run} --what {what}" in text
    # each comparison table still lists the run, with the command in place of its numbers
    for caption in ("Table 1 analogue", "Lasso test R² per latent group (subject",
                    "Pathology sensitivity", "DCI of", "Fraction of lesion-like"):
        assert "not computed" in page.row(caption, "bare")[-1][0]
    assert not (tmp_path / "bare" / "report.html").exists()  # only where it was asked to go


def test_a_trained_run_without_its_metrics_csv_is_not_told_to_resume(tmp_path):
    run = tmp_path / "full"
    make_run(run, "nvmp", 3)
    (run / "metrics.csv").unlink()
    text = Page(write_report([run], tmp_path / "r.html").read_text()).all_text()
    assert "metrics.csv is missing; curves are logged only while a run trains" in text
    assert "train --resume" not in text


def test_every_table_lists_every_run(tmp_path):
    full, bare = tmp_path / "full", tmp_path / "bare"
    make_run(full, "nvmp", 8)
    bare.mkdir()
    (bare / "config.yaml").write_text(yaml.safe_dump({"model": {"kind": "nvae"}}))
    page = Page(write_report([full, bare], tmp_path / "r.html").read_text())
    assert len(page.tables) == 12
    for table in page.tables:
        names = [row[0][0] for row in table["rows"][1:]]
        assert "full" in names and "bare" in names, table["caption"]
        bare_row = next(row for row in table["rows"][1:] if row[0][0] == "bare")
        assert any("not computed -- run pathanat" in text for text, _ in bare_row[1:]) \
            or table["caption"].startswith("Model kind"), table["caption"]


def test_evaluated_without_fid_says_so_and_vae_has_no_cluster_figure(tmp_path):
    run = tmp_path / "vae"
    make_run(run, "vae", 3)
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["fid"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    text = Page(write_report([run], tmp_path / "r.html").read_text()).all_text()
    # the three FIDs and the three KIDs (reconstructions, prior samples, second-stage samples)
    # and the second stage's detail steps
    assert text.count(f"not computed -- run pathanat evaluate {run}") == 7
    assert "--what clusters" not in text


def test_strings_from_files_are_escaped(tmp_path):
    run = tmp_path / "a<b>&c"
    make_run(run, "nvae", 4)
    evil = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'
    write_png(run / "figures" / "synth_layers.png", 5, evil)
    validity = json.loads((run / "validity.json").read_text())
    validity["definition"] = evil
    (run / "validity.json").write_text(json.dumps(validity))
    out = write_report([run], tmp_path / "r.html", title="<i>title</i>")
    text = out.read_text()
    page = Page(text)
    assert "script" not in page.tags and "i" not in page.tags
    assert len([i for i in page.images if i.get("src") == "x"]) == 0
    assert evil in page.all_text() and "a<b>&c" in page.all_text()
    assert "<i>title</i>" in page.all_text()


def test_the_page_data_is_plain_text_for_the_template_to_escape(two_runs):
    """The module hands the template data, never markup: every string is a plain str (no
    jinja2/markupsafe Markup, which the template would not escape)."""
    runs, *_ = two_runs
    page = report_page([read_run(r, r.name) for r in runs], "<b>t</b>")
    found = []

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)
        else:
            assert value is None or type(value) in (str, int, float, bool), type(value)
            found.append(value)

    walk(page)
    assert page["title"] == "<b>t</b>" and len(found) > 500
    assert [s["title"] for s in page["sections"]][:2] == ["Runs", "Reconstruction (Table 1)"]


def test_resumed_step_keeps_the_later_row(tmp_path):
    run = tmp_path / "resumed"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"kind": "vae"}}))
    pd.DataFrame({"step": [10, 20, 30, 20, 30, 40],
                  "train/loss": [5.0, 4.0, 3.0, 4.5, 3.5, 2.5]}).to_csv(run / "metrics.csv",
                                                                       index=False)
    [(name, series)] = curve_series([read_run(run, "resumed")], "train/loss")
    assert name == "resumed"
    assert series.to_dict() == {10: 5.0, 20: 4.5, 30: 3.5, 40: 2.5}


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(PathanatError, match=r"no config\.yaml"):
        write_report([tmp_path], tmp_path / "r.html")
    with pytest.raises(PathanatError, match="one or more run folders"):
        write_report([], tmp_path / "r.html")
    with pytest.raises(PathanatError, match="is a folder"):
        write_report([tmp_path], tmp_path)
    run = tmp_path / "run"
    make_run(run, "vae", 6)
    (run / "analysis.json").write_text("{not json")
    with pytest.raises(InputError, match=r"analysis\.json: not a readable JSON file"):
        write_report([run], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()  # nothing half-written


def test_default_report_path(tmp_path):
    assert default_report_path([tmp_path / "a"]) == tmp_path / "a" / "report.html"
    assert default_report_path([tmp_path / "a", tmp_path / "b"]) == tmp_path / "report.html"


def test_report_of_a_trained_run(tiny_run, tmp_path):
    """The files `pathanat train` really writes: overview and curves, the rest not computed."""
    page = Page(write_report([tiny_run], tmp_path / "r.html").read_text())
    summary = json.loads((tiny_run / "summary.json").read_text())
    overview = page.table("Model kind")
    assert cell(overview, tiny_run.name, "steps")[0] == str(summary["steps"])
    # the parameter count (from the config) is the number of weights the checkpoint holds
    state = load_checkpoint(tiny_run / "checkpoints" / "last.ckpt")["state_dict"]
    weights = sum(v.numel() for k, v in state.items() if k.startswith("model."))
    assert cell(overview, tiny_run.name, "parameters")[1]["data-value"] == str(weights)
    assert f"not computed -- run pathanat evaluate {tiny_run}" in page.all_text()
    assert "Training loss" in [img["alt"] for img in page.images]


# ---- in a browser -------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900",
    "--remote-debugging-pipe",
)
PAGE_STATE = """(() => ({
  tables: document.querySelectorAll("table").length,
  images: Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth})),
  height: document.documentElement.scrollHeight,
}))()"""


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe: the browser reads commands on
    fd 3 and writes replies and events on fd 4, each a JSON message ended by a NUL byte."""

    def __init__(self, executable: str, profile: Path) -> None:
        commands_r, commands_w = os.pipe()
        replies_r, replies_w = os.pipe()
        # move the child's ends to fds >= 10 so that duplicating them onto 3 and 4 cannot
        # overwrite one with the other
        child = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_r, replies_w)]
        for fd in (commands_r, replies_w):
            os.close(fd)
        self.log = profile / "chromium.log"
        self.pid = os.posix_spawn(
            executable, [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"],
            dict(os.environ),
            file_actions=[(os.POSIX_SPAWN_DUP2, child[0], 3), (os.POSIX_SPAWN_DUP2, child[1], 4),
                          (os.POSIX_SPAWN_OPEN, 1, str(self.log),
                           os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                          (os.POSIX_SPAWN_DUP2, 1, 2)],
        )
        for fd in child:
            os.close(fd)
        self.out, self.inp = commands_w, replies_r
        self.buffer = b""
        self.events: list[dict] = []
        self.last_id = 0

    def receive(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.inp], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"chromium did not answer; log: {self.log.read_text()[-2000:]}")
            chunk = os.read(self.inp, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe; log: {self.log.read_text()[-2000:]}")
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self.out, data):]
        deadline = time.monotonic() + timeout
        while True:
            reply = self.receive(deadline)
            if reply.get("id") != self.last_id:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            else:
                return reply["result"]

    def wait_for(self, method: str, session: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            self.events.append(self.receive(deadline))

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close", timeout=10)
        for _ in range(100):
            if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        os.close(self.out)
        os.close(self.inp)


def console_errors(events: list[dict], session: str) -> list[str]:
    """Console errors, uncaught exceptions and browser log errors (failed loads) of a page."""
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if event.get("sessionId") != session:
            continue
        if method == "Runtime.exceptionThrown":
            errors.append(str(params["exceptionDetails"]))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(str(params.get("args")))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(params["entry"]["text"])
    return errors


def render_pages(paths: list[Path], screenshot: Path | None = None) -> list[dict]:
    """Load each HTML file in one headless Chromium: its console errors, tables and images;
    a full-page PNG of the first page is written to ``screenshot`` if given."""
    results = []
    with tempfile.TemporaryDirectory() as profile:
        browser = DevTools(CHROMIUM, Path(profile))
        try:
            for path in paths:
                target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
                session = browser.send("Target.attachToTarget",
                                       {"targetId": target, "flatten": True})["sessionId"]
                for domain in ("Page", "Runtime", "Log"):
                    browser.send(f"{domain}.enable", session=session)
                browser.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session)
                browser.wait_for("Page.loadEventFired", session, timeout=60)
                state = browser.send("Runtime.evaluate", {"expression": PAGE_STATE,
                                                          "returnByValue": True},
                                     session)["result"]["value"]
                if screenshot is not None and not results:
                    shot = browser.send("Page.captureScreenshot", {
                        "format": "png", "captureBeyondViewport": True,
                        "clip": {"x": 0, "y": 0, "width": 1280, "height": state["height"],
                                 "scale": 1}}, session, timeout=60)
                    Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
                state["errors"] = console_errors(browser.events, session)
                results.append(state)
                browser.send("Target.closeTarget", {"targetId": target})
        finally:
            browser.close()
    return results


@pytest.fixture(scope="module")
def chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("PATHANAT_REQUIRE_BROWSER") == "1":
            pytest.fail("PATHANAT_REQUIRE_BROWSER=1 but no chromium on PATH")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); "
                    "set PATHANAT_REQUIRE_BROWSER=1 to make this a failure")
    return CHROMIUM


def test_report_renders_in_chromium_without_errors(chromium, two_runs, tmp_path):
    _, _, page, out = two_runs
    # a page with a failing script and a missing image: proves the checks can fail
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>b'
                      '</title></head><body><table><tr><td>1</td></tr></table>'
                      '<img src="missing.png" alt="m"><script>undefinedFunction()</script>'
                      "</body></html>")
    report, control = render_pages([out, broken])
    assert report["errors"] == []
    assert report["tables"] == len(page.tables) >= 8
    assert len(report["images"]) == len(page.images) >= 5
    assert all(i["complete"] and i["width"] > 0 for i in report["images"])
    assert len(control["errors"]) == 2  # the uncaught exception and the failed image load
    assert control["images"][0]["width"] == 0
