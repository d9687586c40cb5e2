import math

import numpy as np
import pandas as pd
import pytest

from pathanat.errors import InputError
from pathanat.evaluation.latents import (
    dci,
    dci_scores,
    group_importance,
    informativeness_table,
    lasso_r2,
    r2_interval,
)


def latent_groups(n, seed):
    """Five groups of latent maps (n, 2, 3, 3), independent standard normal."""
    rng = np.random.default_rng(seed)
    return {f"z{g}": rng.normal(size=(n, 2, 3, 3)) for g in range(5)}


def test_a_planted_factor_is_found_in_its_group_only():
    weights = np.random.default_rng(0).normal(size=18)

    def lesion_volume(groups, seed):  # in voxels: hundreds, so the paper's alpha = 10 is mild
        noise = np.random.default_rng(seed).normal(size=len(groups["z2"]))
        return 1000 + 100 * groups["z2"].reshape(len(noise), -1) @ weights + 30 * noise

    train, test = latent_groups(400, 1), latent_groups(200, 2)
    table = informativeness_table(
        train,
        {"lesion_volume": lesion_volume(train, 3)},
        test,
        pd.DataFrame({"lesion_volume": lesion_volume(test, 4)}),
    )
    assert list(table.columns) == ["group", "target", "alpha", "r2", "r2_low", "r2_high"]
    assert len(table) == 5 and (table["alpha"] == 10.0).all()
    r2 = table.set_index("group")["r2"]
    assert r2["z2"] > 0.9
    assert (r2.drop("z2") < 0.05).all()  # R^2 is not clipped: these may be slightly negative
    assert r2["z2"] == pytest.approx(
        lasso_r2(train["z2"], lesion_volume(train, 3), test["z2"], lesion_volume(test, 4))
    )


def test_alpha_per_target_and_its_effect():
    train, test = latent_groups(200, 5), latent_groups(100, 6)
    y_tr, y_te = train["z0"][:, 0, 0, 0], test["z0"][:, 0, 0, 0]  # unit scale
    targets_tr, targets_te = (
        {"small": y_tr, "big": 1000 * y_tr},
        {"small": y_te, "big": 1000 * y_te},
    )
    table = informativeness_table(
        {"z0": train["z0"]},
        targets_tr,
        {"z0": test["z0"]},
        targets_te,
        alpha={"small": 0.01, "big": 10.0},
    )
    assert (table["r2"] > 0.99).all()
    # the paper's alpha on a unit-scale target removes every coefficient: R^2 <= 0
    assert lasso_r2(train["z0"], y_tr, test["z0"], y_te) <= 0


def test_entropy_formulas_on_a_hand_computed_matrix():
    r = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    s = dci_scores(r)
    # rows: (1, 0) -> D 1; (1/2, 1/2) -> D 0; (0, 1) -> D 1; weights rho = (1, 2, 2) / 5
    np.testing.assert_allclose(s.disentanglement_per_code, [1.0, 0.0, 1.0], atol=1e-12)
    assert s.disentanglement == pytest.approx(0.2 * 1 + 0.4 * 0 + 0.4 * 1)
    # columns over 3 codes, entropy in base 3
    c1 = 1 - math.log(2) / math.log(3)
    c2 = 1 + (1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3)) / math.log(3)
    np.testing.assert_allclose(s.completeness_per_factor, [c1, c2])
    assert s.completeness == pytest.approx((c1 + c2) / 2)
    # a code with no importance counts as uniform: D_i = 0, and weight 0 in D
    s0 = dci_scores(np.vstack([r, [0.0, 0.0]]))
    assert s0.disentanglement_per_code[-1] == pytest.approx(0.0)
    assert s0.disentanglement == pytest.approx(s.disentanglement)


def planted(mixing, n, seed, noise=0.05):
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(n, mixing.shape[0]))
    return factors @ mixing + noise * rng.normal(size=(n, mixing.shape[1])), factors


@pytest.mark.parametrize("method, floor", [("lasso", 0.95), ("forest", 0.95)])
def test_dci_of_a_one_to_one_code_factor_map_is_near_one(method, floor):
    mixing = np.diag([1.0, -2.0, 0.5, 3.0])
    codes_tr, f_tr = planted(mixing, 300, 0)
    codes_te, f_te = planted(mixing, 150, 1)
    result = dci(codes_tr, f_tr, codes_te, f_te, method=method, factor_names=list("abcd"))
    assert result.codes.disentanglement > floor
    assert result.codes.completeness > floor
    assert (result.test_r2 > 0.9).all()
    table = result.factor_table()
    assert list(table["factor"]) == list("abcd") and (table["test_mse"] < 0.1).all()


def test_dci_of_a_fully_mixed_map_is_near_zero():
    hadamard = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2.0
    codes_tr, f_tr = planted(hadamard, 400, 2)
    codes_te, f_te = planted(hadamard, 200, 3)
    result = dci(codes_tr, f_tr, codes_te, f_te)
    assert result.codes.disentanglement < 0.05
    assert result.codes.completeness < 0.05
    assert (result.test_r2 > 0.9).all()  # informative, just not disentangled


def test_group_level_scores_sum_importances_within_groups():
    # factor 0 spread over codes 0-1 (group "zA"), factor 1 over codes 2-3 (group "zB")
    mixing = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]])
    rng = np.random.default_rng(4)
    extra = rng.normal(size=(2, 4))  # make the two codes of a group not collinear
    codes_tr, f_tr = planted(mixing, 300, 5)
    codes_te, f_te = planted(mixing, 150, 6)
    codes_tr[:, :2] += 0.3 * rng.normal(size=(300, 2)) @ extra[:, :2]
    labels = ["zA", "zA", "zB", "zB"]
    result = dci(codes_tr, f_tr, codes_te, f_te, labels=labels)
    assert result.group_names == ["zA", "zB"]
    assert result.groups.disentanglement > 0.95 and result.groups.completeness > 0.95
    assert result.codes.completeness < 0.8  # per code, each factor lives in two codes
    _, grouped = group_importance(result.codes.importance, labels)
    np.testing.assert_allclose(grouped[0], result.codes.importance[:2].sum(axis=0))


def test_inputs_are_validated():
    x, y = np.random.default_rng(7).normal(size=(2, 20, 3))
    with pytest.raises(InputError, match="one value per sample"):
        lasso_r2(x, y[:, 0], x, y[:-1, 0])
    with pytest.raises(InputError, match="columns"):
        lasso_r2(x, y[:, 0], x[:, :2], y[:, 0])
    with pytest.raises(InputError, match="constant"):
        lasso_r2(x, np.ones(20), x, y[:, 0])
    with pytest.raises(InputError, match="NaN"):
        lasso_r2(np.full((20, 3), np.nan), y[:, 0], x, y[:, 0])
    with pytest.raises(InputError, match="no value for target"):
        informativeness_table({"z0": x}, {"a": y[:, 0]}, {"z0": x}, {"a": y[:, 0]}, alpha={"b": 1})
    with pytest.raises(InputError, match="method"):
        dci(x, y, x, y, method="boosting")
    with pytest.raises(InputError, match="samples"):
        dci(x, y[:10], x, y)
    with pytest.raises(InputError, match="one group label per code"):
        group_importance(np.ones((3, 2)), ["a", "b"])
    with pytest.raises(InputError, match="non-negative"):
        dci_scores(-np.ones((2, 2)))
    with pytest.raises(InputError, match="2 codes x 2 factors"):
        dci_scores(np.ones((1, 2)))


def test_r2_intervals_cover_the_known_r2_of_a_fixed_predictor():
    """y = x.b + e with var(x.b) = var(e): the true predictor's population R^2 is exactly 0.5.
    Over 300 test sets of 40, the 95% interval should hold 0.5 about 95% of the time (a
    percentile bootstrap at n = 40 is known to undercover a little)."""
    rng = np.random.default_rng(0)
    b = rng.normal(size=5)
    covered = []
    for rep in range(300):
        x = rng.normal(size=(40, 5))
        signal = x @ b
        y = signal + rng.normal(size=40) * np.linalg.norm(b)  # var(e) = |b|^2 = var(x.b)
        low, high = r2_interval(y, signal, n_boot=1000, seed=rep)
        covered.append(low <= 0.5 <= high)
    assert 0.88 <= np.mean(covered) <= 0.99


def test_r2_intervals_resample_clusters_whole():
    """Slices of one subject share its error: counting them as independent draws would give
    an interval far too narrow; resampled by subject, it is as wide as with one row per subject."""
    rng = np.random.default_rng(1)
    subjects = 40
    truth = rng.normal(size=subjects)
    y_subject = truth + rng.normal(size=subjects)
    y = np.repeat(y_subject, 20)  # 20 identical slices per subject
    predicted = np.repeat(truth, 20)
    ids = np.repeat(np.arange(subjects), 20)
    by_subject = r2_interval(y_subject, truth, seed=0)
    clustered = r2_interval(y, predicted, ids, seed=0)
    naive = r2_interval(y, predicted, seed=0)
    assert clustered == pytest.approx(by_subject, abs=0.03)
    assert (naive[1] - naive[0]) < 0.5 * (clustered[1] - clustered[0])


def test_informativeness_table_gives_each_r2_with_an_interval_around_it():
    train, test = latent_groups(200, 3), latent_groups(60, 4)
    w = np.random.default_rng(5).normal(size=18)
    target = {s: g["z1"].reshape(len(g["z1"]), -1) @ w + np.random.default_rng(6).normal(
        size=len(g["z1"])) for s, g in (("train", train), ("test", test))}
    table = informativeness_table(train, {"a": target["train"]}, test, {"a": target["test"]},
                                  alpha=0.05, n_jobs=1)
    assert (table["r2_low"] <= table["r2"]).all() and (table["r2"] <= table["r2_high"]).all()
    z1 = table.set_index("group").loc["z1"]
    assert z1["r2_low"] > 0.5  # the planted group: clearly informative
    assert (table.set_index("group").drop("z1")["r2_high"] < 0.3).all()
