"""Lesion-detection metrics against known truth: a score equal to the mask, scikit-learn's
average precision, chance-level scores, and a threshold that must come from the validation
split."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from pathanat.errors import InputError
from pathanat.evaluation.detection import (
    chosen_threshold,
    counts,
    detection_scores,
    score_edges,
)


def phantom_split(seed: int, subjects: int = 8, slices: int = 3, size: int = 16):
    """Slices with square lesions of a size that varies by subject, a brain mask of all but a
    border, and subject ids."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((subjects * slices, size, size), dtype=bool)
    for i in range(len(truth)):
        side = 1 + (i // slices) % 4
        y, x = rng.integers(2, size - 2 - side, 2)
        truth[i, y:y + side, x:x + side] = True
    mask = np.zeros_like(truth)
    mask[:, 1:-1, 1:-1] = True
    return truth, mask, np.repeat(np.arange(subjects), slices)


def scored(val_scores, test_scores, val, test, **kwargs):
    threshold = chosen_threshold(counts(val_scores, *val, score_edges(val_scores, val[1])))
    edges = score_edges(test_scores, test[1], also=threshold)
    return detection_scores(counts(test_scores, *test, edges), threshold, **kwargs)


def test_a_score_equal_to_the_mask_detects_every_lesion_exactly():
    val, test = phantom_split(0), phantom_split(1)
    result = scored(val[0].astype(float), test[0].astype(float), val, test, n_boot=200)
    for key in ("auprc", "dice", "best_dice", "load_correlation"):
        assert result[key]["mean"] == pytest.approx(1.0)
        assert result[key]["ci_low"] == pytest.approx(1.0)
    assert result["n_subjects"] == 8 and result["voxels"] == test[1].sum()


def test_auprc_is_scikit_learns_average_precision_of_the_voxels_in_the_brain():
    """Scores with few distinct values sit in bins of their own, so the binned AP is exact."""
    val, test = phantom_split(2), phantom_split(3)
    rng = np.random.default_rng(4)
    scores = [np.round(rng.normal(size=t[0].shape) + 1.5 * t[0], 1) for t in (val, test)]
    result = scored(*scores, val, test, n_boot=50)
    inside = test[1]
    expected = average_precision_score(test[0][inside], scores[1][inside])
    assert len(np.unique(scores[1][inside])) < 200
    assert result["auprc"]["mean"] == pytest.approx(expected, rel=1e-12)
    assert result["auprc"]["ci_low"] < expected < result["auprc"]["ci_high"]


def test_scores_that_ignore_the_lesions_score_chance():
    val, test = phantom_split(5, subjects=20), phantom_split(6, subjects=20)
    rng = np.random.default_rng(7)
    result = scored(rng.normal(size=val[0].shape), rng.normal(size=test[0].shape), val, test,
                    n_boot=200)
    assert result["auprc"]["mean"] == pytest.approx(result["prevalence"], rel=0.3)
    assert result["dice"]["mean"] < 0.15


def test_the_threshold_comes_from_the_validation_split_alone():
    """Validation lesions score 1 and the rest 0; test lesions 0.6 and the rest 0.4. A threshold
    fit on test separates them perfectly (best Dice 1); the one chosen on validation lies in
    (0, 1] and does not, and changing the test scores does not move it."""
    val, test = phantom_split(8), phantom_split(9)
    val_scores = val[0].astype(float)
    test_scores = np.where(test[0], 0.6, 0.4)
    result = scored(val_scores, test_scores, val, test, n_boot=50)
    assert result["best_dice"]["mean"] == pytest.approx(1.0)
    assert 0 < result["threshold"] <= 1 and result["dice"]["mean"] < 0.9
    again = scored(val_scores, test_scores * 0.5, val, test, n_boot=50)
    assert again["threshold"] == result["threshold"]


def test_bad_inputs_are_named():
    truth, mask, subjects = phantom_split(0)
    edges = score_edges(truth.astype(float), mask)
    with pytest.raises(InputError, match="shapes"):
        counts(truth[:, :-1].astype(float), truth, mask, subjects, edges)
    with pytest.raises(InputError, match="one id per slice"):
        counts(truth.astype(float), truth, mask, subjects[:-1], edges)
    with pytest.raises(InputError, match="finite"):
        score_edges(np.full(truth.shape, np.nan), mask)
    empty = counts(truth.astype(float), np.zeros_like(truth), mask, subjects, edges)
    with pytest.raises(InputError, match="no lesion voxels"):
        chosen_threshold(empty)
    with pytest.raises(InputError, match="one of the test counts' edges"):
        detection_scores(counts(truth.astype(float), truth, mask, subjects, edges), 0.123)
