"""edits: the swap, composition and conditional scores against hand-built truth -- an exact swap
(a's lesions painted into b) scores effectiveness 1 and minimality 0; an even change scores
minimality 1; the intervals match scipy and the subject bootstrap of ``reconstruction.mean_ci``;
the factor R^2 matches scikit-learn's r2_score and picks its factors on validation data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import r2_score

from pathanat.data.phantom import CSF, GM, VENTRICLES, WM
from pathanat.evaluation import edits
from pathanat.evaluation.validity import Scored
from pathanat.metrics import PSNR_CAP, mean_ci

H = W = 32
PIXEL_MM2 = 4.0


def disc(centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def anatomy(n: int, rng: np.random.Generator) -> np.ndarray:
    """Labels (n, H, W): a WM disc in a GM ring in CSF, two small ventricles, sizes varying."""
    dseg = np.zeros((n, H, W), np.uint8)
    for i in range(n):
        r = rng.uniform(11, 14)
        dseg[i][disc((16, 16), r + 2)] = CSF
        dseg[i][disc((16, 16), r)] = GM
        dseg[i][disc((16, 16), r - 3)] = WM
        dseg[i][disc((16, 11), 2) | disc((16, 21), 2)] = VENTRICLES
    return dseg


def image_of(dseg: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    contrast = {0: 0.0, CSF: 0.2, GM: 1.2, WM: 1.0, VENTRICLES: 0.1}
    image = np.vectorize(contrast.get)(dseg).astype(np.float32)
    return np.where(lesion, 3.0, image).astype(np.float32)


@pytest.fixture(scope="module")
def exact_swap():
    """Pairs whose mix is exactly b with a's lesions painted in (all in b's WM), segmented by
    an oracle that returns the truth; b's reconstruction is b itself."""
    rng = np.random.default_rng(0)
    n = 24
    a_dseg, b_dseg = anatomy(n, rng), anatomy(n, rng)
    a_lesion = np.zeros((n, H, W), bool)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            # between the ventricles, inside every WM disc
            a_lesion[i] |= disc((int(rng.integers(12, 21)), int(rng.integers(15, 18))),
                                rng.uniform(1, 1.8))
    b_lesion = np.zeros_like(a_lesion)
    b_lesion[::3] = disc((12, 16), 1.0)
    a_image, b_image = image_of(a_dseg, a_lesion), image_of(b_dseg, b_lesion)
    mix = Scored(image_of(b_dseg, a_lesion), a_lesion, b_dseg)
    recon_a, recon_b = Scored(a_image, a_lesion, a_dseg), Scored(b_image, b_lesion, b_dseg)
    clusters = np.repeat(np.arange(8), 3)
    return dict(a_lesion=a_lesion, b_lesion=b_lesion, b_dseg=b_dseg, b_brain=b_dseg > 0, mix=mix,
                back=b_image, recon_a=recon_a, recon_b=recon_b, clusters=clusters,
                pixel_mm2=PIXEL_MM2)


def test_an_exact_swap_scores_effectiveness_one_and_minimality_zero(exact_swap):
    scores = edits.swap_scores(**exact_swap)
    effect = scores["effectiveness"]
    assert effect["area_correlation"]["mean"] == pytest.approx(1.0)
    assert effect["area_mae_mm2"]["mean"] == 0.0
    assert effect["lesion_dice_where_allowed"]["mean"] == pytest.approx(1.0)
    assert effect["allowed_fraction"] == 1.0
    for tissue in ("ventricles", "WM", "brain"):
        assert scores["anatomy"]["tissue_dice"][tissue]["mean"] == pytest.approx(1.0)
    assert scores["reversibility"]["psnr"]["mean"] == PSNR_CAP
    assert scores["reversibility"]["ssim"]["mean"] == pytest.approx(1.0)
    # b's lesions were replaced by a's: the change is inside the lesion regions only
    assert scores["minimality"]["mean"] == 0.0
    assert scores["minimality"]["n"] == 24 and scores["pairs"] == 24
    # no edit: b's reconstruction holds none of a's lesion areas
    no_edit = effect["no_edit_b_reconstruction"]
    assert no_edit["area_mae_mm2"]["mean"] == pytest.approx(
        np.mean(np.abs(exact_swap["b_lesion"].sum((1, 2)) - exact_swap["a_lesion"].sum((1, 2))))
        * PIXEL_MM2)


def test_lesions_that_fall_in_b_s_ventricles_are_not_asked_for(exact_swap):
    moved = dict(exact_swap)
    a_lesion = exact_swap["a_lesion"].copy()
    a_lesion[0] = disc((16, 11), 2)  # exactly b's left ventricle, where no lesion may sit
    moved["a_lesion"] = a_lesion
    scores = edits.swap_scores(**moved)
    # pair 0 asks for nothing, and the mix's lesion found elsewhere is a miss (Dice 0)
    assert scores["effectiveness"]["lesion_dice_where_allowed"]["mean"] == pytest.approx(23 / 24)
    assert scores["effectiveness"]["allowed_fraction"] == pytest.approx(
        1 - a_lesion[0].sum() / a_lesion.sum())


def test_minimality_of_an_even_change_is_one_and_grows_with_the_change_outside():
    brain = np.ones((2, H, W), bool)
    region = np.zeros((2, H, W), bool)
    region[:, 10:14, 10:14] = True
    even = np.full((2, H, W), 0.5)
    np.testing.assert_allclose(edits.minimality(even, region, brain), 1.0)
    inside_only = np.where(region, 1.0, 0.0)
    # the region is grown by MARGIN_PX before comparing: a change on its rim is not outside
    rim = np.zeros((2, H, W))
    rim[:, 9, 10:14] = 1.0
    np.testing.assert_array_equal(edits.minimality(inside_only + rim, region, brain), 0.0)
    twice_outside = np.where(region, 1.0, 2.0)
    inside = (16 * 1.0 + 20 * 2.0) / 36  # the 4 x 4 region at 1.0, its grown 6 x 6 rim at 2.0
    np.testing.assert_allclose(edits.minimality(twice_outside, region, brain), 2.0 / inside)
    assert np.isnan(edits.minimality(np.zeros((2, H, W)), region, brain)).all()


def test_mean_and_correlation_intervals_match_independent_estimates():
    rng = np.random.default_rng(3)
    clusters = np.repeat(np.arange(12), 5)
    values = rng.normal(size=60) + np.repeat(rng.normal(size=12), 5)
    ours = edits.mean_estimate(values, clusters, seed=0)
    theirs = mean_ci(values, clusters, n_boot=edits.BOOTSTRAP, seed=1)
    assert ours["mean"] == pytest.approx(theirs.mean)
    width = theirs.high - theirs.low
    assert ours["ci_low"] == pytest.approx(theirs.low, abs=0.15 * width)
    assert ours["ci_high"] == pytest.approx(theirs.high, abs=0.15 * width)
    assert (ours["n"], ours["n_subjects"]) == (60, 12)
    with_nan = np.concatenate([values, [np.nan]])
    assert edits.mean_estimate(with_nan, np.append(clusters, 99), 0)["n"] == 60

    x = rng.normal(size=60)
    y = x + rng.normal(size=60)
    r = edits.correlation_estimate(x, y, clusters, seed=0)
    assert r["mean"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert r["ci_low"] < r["mean"] < r["ci_high"]


def test_conditional_scores_count_lesions_in_the_source_s_valid_tissue():
    rng = np.random.default_rng(1)
    dseg = anatomy(2, rng)
    lesion = np.zeros((2, 4, H, W), bool)
    lesion[0, :, 16, 14:18] = True  # WM: valid; 4 pixels in each draw
    lesion[1, :2, 16, 14:18] = True  # source 1: two draws in WM ...
    lesion[1, 2:, 15:17, 10:12] = True  # ... two in the left ventricle (4 pixels each)
    drawn = Scored(np.zeros((2, 4, H, W), np.float32), lesion,
                   np.repeat(dseg[:, None], 4, axis=1))
    scores = edits.conditional_scores(drawn, np.zeros((2, H, W), bool), dseg, np.arange(2),
                                      PIXEL_MM2)
    assert scores["lesion_in_valid_tissue"]["mean"] == pytest.approx((1.0 + 0.5) / 2)
    assert scores["lesion_area_spread_mm2"]["mean"] == 0.0  # every draw has 4 pixels
    assert scores["drawn_lesion_area_mm2"]["mean"] == 4 * PIXEL_MM2
    assert scores["tissue_dice"]["WM"]["mean"] == 1.0
    assert (scores["sources"], scores["draws"]) == (2, 4)

    lesion[1, 2:] = False  # source 1 now draws 4, 4, 0, 0 pixels: spread 2 pixels
    spread = edits.conditional_scores(drawn, np.zeros((2, H, W), bool), dseg, np.arange(2),
                                      PIXEL_MM2)["lesion_area_spread_mm2"]["mean"]
    assert spread == pytest.approx((0 + 2 * PIXEL_MM2) / 2)


def test_composition_of_an_exact_null_edit_keeps_everything():
    rng = np.random.default_rng(2)
    dseg = anatomy(6, rng)
    lesion = np.zeros((6, H, W), bool)
    lesion[:, 16, 14:18] = True
    first = Scored(image_of(dseg, lesion), lesion, dseg)
    shrunk = lesion.copy()
    shrunk[:, 16, 14] = False  # one pixel lost per slice after ten edits
    scores = edits.composition_scores(
        first, {1: first, 10: Scored(first.images, shrunk, dseg)}, np.arange(6), PIXEL_MM2)
    assert scores["1"]["psnr"]["mean"] == PSNR_CAP
    assert scores["1"]["lesion_area_drift_mm2"]["mean"] == 0.0
    assert scores["10"]["lesion_area_drift_mm2"]["mean"] == -PIXEL_MM2
    assert scores["10"]["lesion_area_abs_drift_mm2"]["mean"] == PIXEL_MM2


def test_factor_r2_matches_sklearn_and_holds_only_factors_known_on_validation():
    rng = np.random.default_rng(4)

    def split(n):
        codes = rng.normal(size=(n, 40))
        factors = pd.DataFrame({"known": codes[:, :3].sum(1) + 0.3 * rng.normal(size=n),
                                "unknown": rng.normal(size=n)})
        return codes, factors

    (xtr, ytr), (xval, yval), (xte, yte) = split(400), split(100), split(120)
    clusters = np.repeat(np.arange(24), 5)
    scrambled = xte[rng.permutation(120)]
    result = edits.factor_r2(xtr, ytr, xval, yval, {"same": xte, "scrambled": scrambled}, yte,
                             clusters)
    assert result["held"] == ["known"]
    assert result["val_r2"]["known"] > 0.9 > 0.1 > result["val_r2"]["unknown"]
    fit = edits.make_pipeline(edits.StandardScaler(),
                              edits.RidgeCV(alphas=edits.RIDGE_ALPHAS, alpha_per_target=True))
    scale = ytr.std(ddof=0)
    fit.fit(xtr, (ytr - ytr.mean()) / scale)
    predicted = fit.predict(xte) * scale.to_numpy() + ytr.mean().to_numpy()
    for j, name in enumerate(["known", "unknown"]):
        assert result["same"]["r2"][name]["mean"] == pytest.approx(
            r2_score(yte[name], predicted[:, j]), abs=1e-4)
    assert result["same"]["mean_r2_held"]["mean"] == pytest.approx(
        result["same"]["r2"]["known"]["mean"])
    assert result["same"]["mean_r2_held"]["mean"] > 0.9
    assert result["scrambled"]["mean_r2_held"]["mean"] < 0.0  # codes of other items
