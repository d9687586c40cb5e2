import numpy as np
import pytest
from skimage.metrics import structural_similarity

from pathanat.errors import InputError
from pathanat.metrics import (
    PSNR_CAP,
    estimate_text,
    mean_ci,
    psnr,
    reconstruction_table,
    ssim,
    ssim_map,
    summary_table,
)


def skimage_ssim(a, b, data_range, full=False):
    return structural_similarity(
        a,
        b,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=data_range,
        full=full,
    )


def structured_pair(n=4, h=40, w=48, seed=0):
    """Smooth 'anatomy' with edges, and a blurred, noisy, shifted reconstruction of it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    ref = np.stack(
        [
            np.where((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (8 + 3 * i) ** 2, 2.0, -1.0)
            + np.sin(xx / (2 + i))
            for i in range(n)
        ]
    )
    rec = 0.9 * np.roll(ref, 1, axis=2) + 0.2 * rng.normal(size=ref.shape)
    return ref, rec


def test_psnr_of_a_constant_offset_is_analytic():
    rng = np.random.default_rng(1)
    ref = rng.uniform(-2, 3, size=(3, 20, 24))
    ref[:, 0, 0], ref[:, 0, 1] = -2.0, 3.0  # every slice spans exactly 5
    for d in (0.01, 0.5, 2.0):
        expected = 10 * np.log10(5.0**2 / d**2)
        np.testing.assert_allclose(psnr(ref, ref + d), expected, rtol=1e-12)
        np.testing.assert_allclose(psnr(ref, ref - d, data_range=10.0), 10 * np.log10(100 / d**2))


def test_masked_psnr_averages_the_error_inside_the_mask_only():
    ref = np.zeros((2, 16, 16))
    ref[:, 0, 0] = 4.0
    rec = ref.copy()
    rec[:, 8:, :] += 1.0  # error only in the lower half
    mask = np.zeros(ref.shape, bool)
    mask[:, :8, :] = True
    assert np.all(psnr(ref, rec, mask=mask) == PSNR_CAP)
    np.testing.assert_allclose(psnr(ref, rec, mask=~mask), 10 * np.log10(16.0))
    np.testing.assert_allclose(psnr(ref, rec), 10 * np.log10(16.0 / 0.5))


def test_identical_images_give_ssim_one_and_capped_psnr():
    ref, _ = structured_pair()
    assert np.all(psnr(ref, ref) == PSNR_CAP)
    np.testing.assert_allclose(ssim(ref, ref), 1.0, atol=1e-12)
    table = reconstruction_table(ref, ref, mask=ref > 0)
    assert np.isfinite(table.to_numpy()).all()


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("data_range", [None, 7.5])
def test_ssim_matches_scikit_image(kind, data_range):
    if kind == "random":
        rng = np.random.default_rng(2)
        ref = rng.normal(size=(3, 33, 29))
        rec = ref + 0.5 * rng.normal(size=ref.shape)
    else:
        ref, rec = structured_pair()
    ours = ssim(ref, rec, data_range)
    mask = np.zeros(ref.shape, bool)
    mask[:, 3:25, 4:20] = True
    ours_masked = ssim(ref, rec, data_range, mask)
    for i in range(len(ref)):
        r = data_range if data_range is not None else ref[i].max() - ref[i].min()
        value, full = skimage_ssim(ref[i], rec[i], r, full=True)
        assert abs(ours[i] - value) < 1e-6
        assert abs(ours_masked[i] - full[mask[i]].mean()) < 1e-6
        np.testing.assert_allclose(
            ssim_map(ref[i : i + 1], rec[i : i + 1], data_range)[0], full, atol=1e-9
        )


def test_reconstruction_table_accepts_a_channel_axis_and_agrees_with_parts():
    ref, rec = structured_pair()
    mask = ref > 0
    table = reconstruction_table(ref[:, None], rec[:, None], mask=mask[:, None])
    assert list(table.columns) == ["psnr", "ssim", "psnr_brain", "ssim_brain"]
    np.testing.assert_allclose(table["ssim_brain"], ssim(ref, rec, mask=mask))
    np.testing.assert_allclose(table["psnr"], psnr(ref, rec))


def test_t_interval_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(3)
    widths = []
    for n in (10, 100, 1000):
        ci = mean_ci(rng.normal(2.0, 1.0, size=n))
        assert ci.low < ci.mean < ci.high
        widths.append(ci.high - ci.low)
    assert widths[0] > widths[1] > widths[2]
    # t-interval of n = 10 equals the textbook value
    v = np.arange(10.0)
    ci = mean_ci(v)
    half = 2.2621571627409915 * v.std(ddof=1) / np.sqrt(10)  # t_{0.975, 9}
    np.testing.assert_allclose([ci.low, ci.high], [4.5 - half, 4.5 + half])


def test_subject_bootstrap_is_wider_than_slice_t_interval_for_clustered_slices():
    rng = np.random.default_rng(4)
    subjects = np.repeat(np.arange(20), 10)
    values = rng.normal(size=20)[subjects] + 0.1 * rng.normal(size=200)  # subject effect dominates
    naive, clustered = mean_ci(values), mean_ci(values, subjects)
    assert clustered.low < clustered.mean < clustered.high
    assert clustered.n_subjects == 20 and "bootstrap" in clustered.method
    assert clustered.high - clustered.low > 2 * (naive.high - naive.low)
    # ... and it shrinks as subjects are added
    subjects_big = np.repeat(np.arange(200), 10)
    values_big = rng.normal(size=200)[subjects_big] + 0.1 * rng.normal(size=2000)
    big = mean_ci(values_big, subjects_big)
    assert big.high - big.low < clustered.high - clustered.low
    summary = summary_table(reconstruction_table(*structured_pair(n=6)), np.repeat([0, 1, 2], 2))
    assert list(summary["metric"]) == ["psnr", "ssim"]
    assert (summary["ci_low"] <= summary["mean"]).all()


def test_inputs_are_validated():
    ref, rec = structured_pair()
    with pytest.raises(InputError, match="reconstruction has shape"):
        psnr(ref, rec[:, :-1])
    with pytest.raises(InputError, match="mask has shape"):
        ssim(ref, rec, mask=np.ones(ref.shape[1:], bool))
    with pytest.raises(InputError, match="binary"):
        ssim(ref, rec, mask=np.full(ref.shape, 0.5))
    empty = np.ones(ref.shape, bool)
    empty[1] = False
    with pytest.raises(InputError, match=r"empty in slice\(s\) \[1\]"):
        psnr(ref, rec, mask=empty)
    with pytest.raises(InputError, match="NaN"):
        psnr(ref, np.full(ref.shape, np.nan))
    flat = ref.copy()
    flat[2] = 0.0
    with pytest.raises(InputError, match=r"slice\(s\) \[2\] are constant"):
        ssim(flat, rec)
    with pytest.raises(InputError, match="smaller than"):
        ssim(ref[:, :8, :8], rec[:, :8, :8])
    with pytest.raises(InputError, match="subject_ids"):
        mean_ci(np.ones(4), subject_ids=np.zeros(3))
    with pytest.raises(InputError, match="at least 2"):
        mean_ci(np.ones(1))


def test_an_estimate_reads_as_mean_and_interval():
    psnr_ci = {"mean": 26.2049, "ci_low": 25.61, "ci_high": 26.7}
    assert estimate_text(psnr_ci) == "26.2 [25.61, 26.7]"
    assert estimate_text(psnr_ci, 3) == "26.2 [25.6, 26.7]"
    assert estimate_text({"mean": 0.5, "ci_low": None, "ci_high": None}) == "0.5"
    assert estimate_text({"mean": None}) == "n/a" and estimate_text(None) == "n/a"
