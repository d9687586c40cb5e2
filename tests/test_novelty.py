"""The copy test on draws whose relation to the training set is known."""

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from pathanat.errors import InputError
from pathanat.evaluation.novelty import copy_test, nearest_distances


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 6, 5)).astype(np.float32)


def test_nearest_distances_match_a_brute_force_search():
    train, query = images(300, 0), images(40, 1)
    expected = NearestNeighbors(n_neighbors=1).fit(train.reshape(300, -1)).kneighbors(
        query.reshape(40, -1))[0][:, 0]
    np.testing.assert_allclose(nearest_distances(query, train, batch=7), expected, rtol=1e-5)


def test_new_draws_score_as_new_data_and_copies_as_copies():
    train, held_out = images(500, 2), images(2000, 3)
    new = copy_test(images(2000, 4), held_out, train)  # the same distribution, unseen
    assert 0.97 < new["distance_ratio"] < 1.03
    assert 0.035 < new["near_copies"] < 0.065  # the held-out's own rate, 0.05
    rng = np.random.default_rng(5)
    copies = train[rng.integers(0, 500, 1000)]
    copied = copy_test(copies, held_out, train)
    assert copied["distance_ratio"] == 0.0 and copied["near_copies"] == 1.0
    # copies with a little noise: nearer than new data, still flagged
    near = copy_test(copies + 0.2 * rng.normal(size=copies.shape), held_out, train)
    assert near["distance_ratio"] < 0.5 and near["near_copies"] > 0.9
    assert (new["draws"], new["held_out"], new["training"]) == (2000, 2000, 500)


def test_mismatched_or_empty_sets_are_refused():
    with pytest.raises(InputError, match="expected \\(6, 5\\)"):
        nearest_distances(np.zeros((2, 5, 6)), images(3, 0))
    with pytest.raises(InputError, match="at least one"):
        copy_test(images(0, 0), images(3, 0), images(3, 1))
