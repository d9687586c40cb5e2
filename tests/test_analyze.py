"""analyze: on a stub model with pathology planted in one group by construction, the analyses
find that group; on a tiny trained run, analyze_run writes its tables and figures."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from pathanat.data.prepare import CacheSplit
from pathanat.errors import InputError, PathanatError
from pathanat.evaluation.analyze import analyze, analyze_run, r2_tables, subject_average

N = 16  # image side
SQUARE = [(i, j) for i in range(5, 11) for j in range(5, 11)]  # lesions fill it in this order
LESION, HEALTHY = 2.5, 1.0
PIXEL_MM2, SLICE_MM = 16.0, 4.0  # 4 mm pixels and slices


def lesion_mask(count: np.ndarray) -> np.ndarray:
    """(len(count), N, N) masks whose first ``count`` pixels of SQUARE are lesion."""
    mask = np.zeros((len(count), N, N), dtype=bool)
    for k, (i, j) in enumerate(SQUARE):
        mask[:, i, j] = k < count
    return mask


@dataclass
class Out:
    x_mean: torch.Tensor
    z: list[torch.Tensor] | None = None


class PlantedModel:
    """encode: z0 = noise (2 x 2 x 2), z1 = the slice's lesion area everywhere in channel 0 and
    noise in channel 1 (2 x 4 x 4), z2 = the image with lesions painted healthy (the anatomy) and
    noise (2 x N x N). decode paints round(z1's mean) lesion pixels over z2's anatomy, and adds a
    small brain-wide term from the noise of z0 and z1, so every group changes the image and only
    z1 changes the lesions."""

    def encode(self, x: torch.Tensor) -> Out:
        x = x[:, 0]
        lesion = x > (LESION + HEALTHY) / 2
        noise = torch.stack([  # a deterministic function of each image, unrelated to its lesions
            torch.randn(2 + 32 + 512, generator=torch.Generator().manual_seed(
                int(abs(float(img.sum())) * 1e4) % 2**31))
            for img in x
        ])
        area = lesion.sum(dim=(1, 2)).float()
        z0 = noise[:, :8].view(-1, 2, 2, 2)
        z1 = torch.stack([area[:, None, None].expand(-1, 4, 4), noise[:, 8:24].view(-1, 4, 4)], 1)
        anatomy = torch.where(lesion, torch.full_like(x, HEALTHY), x)
        z2 = torch.stack([anatomy, noise[:, 32 : 32 + 256].view(-1, N, N)], 1)
        return Out(x_mean=None, z=[z0, z1, z2])

    def decode(self, z: list[torch.Tensor], size) -> Out:
        anatomy = z[2][:, 0]
        count = z[1][:, 0].mean(dim=(1, 2)).round().numpy()
        mask = torch.from_numpy(lesion_mask(count))
        brain = anatomy > 0.5
        drift = 0.02 * (z[0].mean(dim=(1, 2, 3)) + z[1][:, 1].mean(dim=(1, 2)))
        x = torch.where(mask, torch.full_like(anatomy, LESION), anatomy)
        x = x + brain * drift[:, None, None]
        return Out(x_mean=x[:, None])


def planted_split(name: str, subjects: int, seed: int) -> CacheSplit:
    """Discs of a per-subject radius (anatomy) with per-slice lesion counts around a per-subject
    load; 4 slices per subject."""
    rng = np.random.default_rng(seed)
    rows, images, brains, lesions = [], [], [], []
    ii, jj = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    for s in range(subjects):
        radius, load = rng.uniform(5.5, 7.5), rng.integers(4, 28)
        counts = np.clip(load + rng.integers(-4, 5, 4), 1, len(SQUARE))
        brain = (ii - 7.5) ** 2 + (jj - 7.5) ** 2 < radius**2
        lesion = lesion_mask(counts) & brain
        for k in range(4):
            images.append(np.where(lesion[k], LESION, HEALTHY * brain))
            brains.append(brain)
            lesions.append(lesion[k])
            rows.append({"subject": f"{name}-{s:02d}", "slice": k, "z_mm": float(k),
                         "radius": radius, "noise_seed": s, "lesion_volume_mm3": 0.0})
    lesion_arr = np.array(lesions)
    table = pd.DataFrame(rows)
    # the subject's lesion volume: the sum of its slices' lesion areas times their thickness
    table["lesion_volume_mm3"] = table.groupby("subject")["subject"].transform(
        lambda g: lesion_arr[g.index].sum()) * PIXEL_MM2 * SLICE_MM
    return CacheSplit(name, np.array(images, np.float32), np.array(brains, np.uint8),
                      lesion_arr.astype(np.uint8), None, table)


@pytest.fixture(scope="module")
def planted():
    train, test = planted_split("train", 30, 0), planted_split("test", 12, 1)
    return analyze(PlantedModel(), train, test, examples=6, pixel_mm2=PIXEL_MM2)


def test_lasso_r2_is_high_for_the_planted_group_only(planted):
    summary, tables, _ = planted
    for unit in ("slice", "subject"):
        r2 = summary["table4"][unit]["r2"]
        assert r2["z1"] > 0.95, (unit, r2)
        assert r2["z0"] < 0.2 and r2["z2"] < 0.2, (unit, r2)
    assert summary["table4"]["slice"]["target"] == "lesion_area_mm2"
    assert summary["table4"]["subject"]["target"] == "lesion_volume_mm3"
    assert summary["table4"]["samples"] == {"slice": [120, 48], "subject": [30, 12]}
    # the anatomy factor lives in z2 and only there; seeds are not analysed
    radius = tables["r2_factors_subject"].query("target == 'radius'").set_index("group")["r2"]
    assert radius["z2"] > 0.8 and radius["z0"] < 0.2 and radius["z1"] < 0.2
    assert "noise_seed" not in set(tables["r2_factors_slice"]["target"])


def test_dci_finds_one_group_per_factor(planted):
    summary, tables, _ = planted
    dci = summary["dci"]
    # the slice's lesion area stands for the pathology; seeds are no factors
    assert dci["factors"] == ["lesion_area_mm2", "radius"]
    assert dci["disentanglement_groups"] > 0.9 and dci["completeness_groups"] > 0.9
    groups = tables["dci_groups"].set_index("group")
    assert groups.loc["z1", "importance_radius"] == pytest.approx(0, abs=1e-3)
    assert groups.loc["z2", "importance_lesion_area_mm2"] < 0.05 * groups.loc[
        "z1", "importance_lesion_area_mm2"]


def test_sensitivity_peaks_at_the_planted_group(planted):
    summary, tables, figure = planted
    ratio = summary["sensitivity"]["ratio"]
    assert summary["sensitivity"]["z_p_posthoc"] == "z1"
    assert ratio["z1"] > 4 * max(ratio["z0"], ratio["z2"])
    assert 0.5 < ratio["z0"] < 2  # a brain-wide change: the same inside and outside lesions
    assert figure["decoded"].shape == (3, 5, N, N)
    # scaling z1 by 0 removes every lesion: the change inside lesions is exactly their contrast
    row = tables["sensitivity"].query("group == 'z1' and factor == 0").iloc[0]
    assert row["change_pathology"] == pytest.approx(LESION - HEALTHY, rel=0.02)
    # the examples are the test slices with the largest lesions
    assert len(summary["sensitivity"]["examples"]) == 6


def test_subject_average_keeps_first_seen_order():
    ids, means = subject_average(np.array([[1.0], [3.0], [10.0], [5.0]]),
                                 np.array(["b", "b", "a", "b"]))
    assert list(ids) == ["b", "a"]
    np.testing.assert_allclose(means[:, 0], [3.0, 10.0])


def test_a_cohort_without_pathology_columns_is_refused():
    train, test = planted_split("train", 3, 0), planted_split("test", 3, 1)
    train = CacheSplit("train", train.image, train.brain, train.lesion, None,
                       train.slices.drop(columns="lesion_volume_mm3"))
    with pytest.raises(InputError, match="lesion_volume_mm3"):
        analyze(PlantedModel(), train, test)
    with pytest.raises(PathanatError, match="factors"):
        analyze(PlantedModel(), test, test, factors=())


def test_analyze_run_writes_json_csvs_and_figures(tiny_run):
    summary = analyze_run(tiny_run, factors=(0.0, 2.0), examples=2)
    written = json.loads((tiny_run / "analysis.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["pathology"] == "ms" and written["groups"] == [f"z{i}" for i in range(5)]
    assert written["sensitivity"]["z_p_posthoc"] in written["groups"]
    for name in written["tables"]:
        assert len(pd.read_csv(tiny_run / name)) > 0
    table4 = pd.read_csv(tiny_run / "analysis" / "table4_subject.csv")
    assert list(table4["group"]) == written["groups"] and set(table4["alpha"]) == {10.0}
    for figure in ("latent_r2.png", "pathology_sensitivity.png"):
        assert (tiny_run / "figures" / figure).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(PathanatError, match="held-out"):
        analyze_run(tiny_run, split="train")


def test_ad_uses_atrophy_severity_and_csf_versus_tissue():
    """The planted data read as AD: the bright pixels are labelled CSF, the rest of the brain WM,
    and the subject's 'atrophy severity' is its load scaled to [0, 1]."""
    from pathanat.data.phantom import CSF, WM

    def as_ad(split: CacheSplit) -> CacheSplit:
        dseg = np.where(split.lesion > 0, CSF, np.where(split.brain > 0, WM, 0)).astype(np.uint8)
        table = split.slices.drop(columns="lesion_volume_mm3")
        table["atrophy_severity"] = split.slices["lesion_volume_mm3"] / 36 / 4 / PIXEL_MM2 / 4
        return CacheSplit(split.name, split.image, split.brain, None, dseg, table)

    train, test = as_ad(planted_split("train", 30, 0)), as_ad(planted_split("test", 12, 1))
    summary = analyze(PlantedModel(), train, test, examples=4)[0]
    assert summary["pathology"] == "ad"
    for unit in ("slice", "subject"):
        entry = summary["table4"][unit]
        assert entry["target"] == "atrophy_severity" and entry["scale"] == "standardised"
        assert entry["r2"]["z1"] > 0.8 and max(entry["r2"]["z0"], entry["r2"]["z2"]) < 0.2
    assert summary["sensitivity"]["regions"] == "CSF vs tissue"
    assert summary["sensitivity"]["z_p_posthoc"] == "z1"


def test_a_target_constant_on_the_test_split_is_skipped_not_fatal():
    # one test subject: a subject-level target has a single value there, so R^2 is undefined
    codes = [np.random.default_rng(0).normal(size=(4, 3))]
    train = pd.DataFrame({"lesion_volume_mm3": [1.0, 2.0, 3.0, 4.0]})
    test = pd.DataFrame({"lesion_volume_mm3": [5.0, 5.0, 5.0, 5.0]})
    table, skipped = r2_tables(["z0"], codes, codes, train, test)
    assert table.empty and skipped == ["lesion_volume_mm3"]
    assert table.attrs["not_converged"] == 0
