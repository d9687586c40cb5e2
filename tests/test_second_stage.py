from dataclasses import replace

import numpy as np
import pytest
import torch

from pathanat.errors import InputError
from pathanat.models import HierarchicalVAE, HVAEConfig
from pathanat.models.second_stage import (
    calibrated,
    fit_model_second_stage,
    fit_second_stage,
    principal_directions,
)

SHAPES = [(1, 2, 2), (2, 2, 3)]  # 4 + 12 = 16 values per code


def flat(draws):
    return torch.cat([d.flatten(1) for d in draws], 1).double().numpy()


def two_clusters(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """600 codes in two tight clusters at +-5 along a random unit direction: (codes, direction,
    each code's side)."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=16)
    direction /= np.linalg.norm(direction)
    side = rng.choice([-5.0, 5.0], size=600)
    codes = (side + 0.3 * rng.normal(size=600))[:, None] * direction + 0.1 * rng.normal(
        size=(600, 16))
    return codes, direction, side


def test_one_component_draws_have_the_codes_mean_and_covariance_and_stay_in_their_span():
    """Codes from a rank-3 Gaussian in 16 dimensions: with one component the fit is the sample
    moments, so draws reproduce them, and nothing leaves the codes' span."""
    rng = np.random.default_rng(0)
    codes = 2.0 + rng.normal(size=(400, 3)) @ rng.normal(size=(3, 16))
    fitted = fit_second_stage(codes, SHAPES, dims=8, components=1)
    assert fitted.directions.shape[0] == 3
    draws = fitted.draw(200_000, generator=torch.Generator().manual_seed(1))
    assert [tuple(d.shape[1:]) for d in draws] == SHAPES
    x = flat(draws)
    np.testing.assert_allclose(x.mean(0), codes.mean(0), atol=0.03)
    scale = np.abs(np.cov(codes.T)).max()
    np.testing.assert_allclose(np.cov(x.T), np.cov(codes.T), atol=0.05 * scale)
    _, _, vt = np.linalg.svd(codes - codes.mean(0))
    assert np.abs((x - codes.mean(0)) @ vt[3:].T).max() < 1e-3
    np.testing.assert_allclose(flat(fitted.draw(2, 0.0)), np.repeat(codes.mean(0)[None], 2, 0),
                               rtol=1e-5)


def test_draws_keep_to_the_first_dims_principal_directions():
    """With dims below the codes' rank, draws follow the codes' moments projected on their
    first dims principal directions (numpy's SVD as the oracle) and nothing else."""
    rng = np.random.default_rng(1)
    codes = rng.normal(size=(400, 4)) * [4.0, 2.0, 1.0, 0.5] @ np.linalg.qr(
        rng.normal(size=(16, 4)))[0].T
    x = flat(fit_second_stage(codes, SHAPES, dims=2, components=1).draw(
        200_000, generator=torch.Generator().manual_seed(2)))
    centred = codes - codes.mean(0)
    top = np.linalg.svd(centred, full_matrices=False)[2][:2]
    projector = top.T @ top
    np.testing.assert_allclose(x.mean(0), codes.mean(0), atol=0.03)
    np.testing.assert_allclose(np.cov(x.T), projector @ np.cov(codes.T) @ projector,
                               atol=0.05 * 16)
    assert np.abs((x - codes.mean(0)) @ (np.eye(16) - projector)).max() < 1e-3


def test_the_mixture_keeps_two_clusters_apart_where_one_gaussian_blends_them():
    """Two tight clusters at +-5 along one direction: a single Gaussian puts much of its mass
    between them (where no code is), the mixture almost none."""
    codes, direction, _ = two_clusters(2)
    between = {}
    for k in (1, 2):
        draws = flat(fit_second_stage(codes, SHAPES, dims=4, components=k).draw(
            20_000, generator=torch.Generator().manual_seed(0)))
        between[k] = np.mean(np.abs(draws @ direction) < 2.5)
    assert between[1] > 0.3 and between[2] < 0.01


def test_bad_codes_and_draws_are_refused():
    with pytest.raises(InputError, match="codes"):
        fit_second_stage(np.full((5, 16), np.nan), SHAPES)
    with pytest.raises(InputError, match="16 values"):
        fit_second_stage(np.zeros((5, 15)), SHAPES)
    good = np.random.default_rng(0).normal(size=(30, 16))
    with pytest.raises(InputError, match="dims"):
        fit_second_stage(good, SHAPES, dims=0)
    with pytest.raises(InputError, match="components"):
        fit_second_stage(good, SHAPES, components=31)
    with pytest.raises(InputError, match="n: expected"):
        fit_second_stage(good, SHAPES, components=1).draw(0)


def test_a_model_fit_covers_every_group_and_decodes():
    torch.manual_seed(0)
    model = HierarchicalVAE(HVAEConfig(kind="nvae", image_size=(16, 16), levels=2, width=8,
                                       cells_per_scale=1)).eval()
    images = np.random.default_rng(0).normal(size=(20, 16, 16)).astype(np.float32)
    held_out = np.random.default_rng(1).normal(size=(10, 16, 16)).astype(np.float32)
    fitted = fit_model_second_stage(model, images, held_out, batch_size=8)
    assert 1 / 64 <= fitted.spread <= 4
    assert fitted.shapes == model.group_shapes((16, 16))
    assert len(fitted.weights) == 1  # 20 codes: one component (one per 40 codes, at least one)
    out = model.from_residuals(fitted.draw(4), (16, 16))
    assert out.x_mean.shape == (4, 1, 16, 16) and torch.isfinite(out.x_mean).all()


def test_conditioned_on_one_group_the_other_is_drawn_from_the_gaussian_conditional():
    """One component on full-rank codes is their sample Gaussian: given group 0, group 1 must
    follow the conditional that the Schur complement of the codes' covariance gives."""
    rng = np.random.default_rng(3)
    codes = 1.0 + rng.normal(size=(500, 3)) @ rng.normal(size=(3, 16)) + rng.normal(
        size=(500, 16))
    # every direction drawn (dims = 16)
    fitted = fit_second_stage(codes, SHAPES, dims=16, components=1)
    y = codes[0, :4] + 0.5
    draws = fitted.draw_given([torch.tensor(y.reshape(1, 2, 2)), None], 200_000,
                              generator=torch.Generator().manual_seed(4))
    x = flat(draws)
    np.testing.assert_array_equal(x[:, :4], np.repeat(y[None], len(x), 0).astype(np.float32))
    m, C = codes.mean(0), np.cov(codes.T, bias=True)  # EM's covariance: the MLE
    C += 1e-3 * np.linalg.eigvalsh(np.cov(codes.T)).max() * np.eye(16)  # its stated ridge
    gain = C[4:, :4] @ np.linalg.inv(C[:4, :4])  # the fitted noise is ~0 for full-rank codes
    np.testing.assert_allclose(x[:, 4:].mean(0), m[4:] + gain @ (y - m[:4]), atol=0.02)
    np.testing.assert_allclose(np.cov(x[:, 4:].T), C[4:, 4:] - gain @ C[:4, 4:],
                               atol=0.03 * np.abs(C).max())


def test_conditioned_on_a_code_of_one_cluster_the_draws_come_from_that_cluster():
    codes, direction, side = two_clusters(5)
    fitted = fit_second_stage(codes, SHAPES, dims=4, components=2)
    for sign in (-1, 1):
        given = codes[np.flatnonzero(side == 5.0 * sign)[0], :4]
        x = flat(fitted.draw_given([torch.tensor(given.reshape(1, 2, 2)), None], 5000,
                                   generator=torch.Generator().manual_seed(6)))
        along = x[:, 4:] @ direction[4:] / np.linalg.norm(direction[4:]) ** 2
        assert np.all(np.sign(along) == sign) and abs(np.median(along) - 5 * sign) < 0.5


def test_off_span_noise_is_what_a_new_code_has_outside_the_training_span():
    """Group 0 is an exactly rank-1 signal, group 1 independent noise of variance 0.25 in 400
    values: 36 fitted codes span at most 35 directions, so a held-out code keeps about
    (1 - 35/404) of its noise off the span and almost nothing of its signal; off the span of the
    first 2 directions (the signal's and one of noise) it keeps nearly all its noise."""
    rng = np.random.default_rng(7)
    t = rng.normal(size=(40, 1))
    codes = np.concatenate([5 * t @ rng.normal(size=(1, 4)), 0.5 * rng.normal(size=(40, 400))],
                           1)
    fitted = fit_second_stage(codes, [(1, 2, 2), (1, 20, 20)], dims=64, components=1)
    noise = fitted.noise.numpy()
    assert 0.18 < noise[1] < 0.28  # 0.25 x (1 - 35/404) = 0.228
    assert noise[0] < 0.01 * codes[:, :4].var(0).mean()
    narrow = fit_second_stage(codes, [(1, 2, 2), (1, 20, 20)], dims=2, components=1).noise
    assert 0.22 < float(narrow[1]) < 0.29 and float(narrow[0]) < 0.01 * codes[:, :4].var(0).mean()


def test_conditioning_on_every_group_or_none_and_bad_known_values():
    codes = np.random.default_rng(8).normal(size=(50, 16))
    fitted = fit_second_stage(codes, SHAPES, dims=2, components=2)
    known = [torch.tensor(codes[0, :4].reshape(1, 2, 2)),
             torch.tensor(codes[0, 4:].reshape(2, 2, 3))]
    np.testing.assert_allclose(flat(fitted.draw_given(known, 3)),
                               np.repeat(codes[:1], 3, 0), rtol=1e-6)
    assert flat(fitted.draw_given([None, None], 3)).shape == (3, 16)
    with pytest.raises(InputError, match="one entry per group"):
        fitted.draw_given(known[:1], 3)
    with pytest.raises(InputError, match=r"known\[1\]"):
        fitted.draw_given([None, torch.zeros(2, 3, 2)], 3)


@pytest.mark.parametrize("shape", [(40, 300), (300, 40)])
def test_principal_directions_match_numpy_svd_and_drop_zero_directions(shape):
    """Both Gram routes (fewer rows than columns, and the other way) against numpy's SVD, on a
    rank-6 matrix: the first singular triplets agree, and nothing past the rank is returned."""

    rng = np.random.default_rng(3)
    a = rng.normal(size=(shape[0], 6)) @ np.diag([9.0, 5, 3, 2, 1, 0.5]) @ rng.normal(
        size=(6, shape[1]))
    u, s, vt = principal_directions(torch.from_numpy(a), count=10)
    _, ref_s, ref_vt = np.linalg.svd(a, full_matrices=False)
    assert s.shape == (6,) and u.shape == (shape[0], 6) and vt.shape == (6, shape[1])
    np.testing.assert_allclose(s.numpy(), ref_s[:6], rtol=1e-9)
    np.testing.assert_allclose(np.abs((vt.numpy() * ref_vt[:6]).sum(1)), 1.0, atol=1e-9)
    np.testing.assert_allclose((u * s).numpy() @ vt.numpy(), a, atol=1e-8 * np.abs(a).max())
    assert principal_directions(torch.from_numpy(a), count=3)[1].shape == (3,)


def test_calibration_keeps_a_true_density_and_undoes_a_known_widening_or_narrowing():
    """Codes and held-out codes from one rank-3 Gaussian: the fitted Gaussian is (nearly) the
    truth, whose draws lie as near the codes as new codes do, so the factor is ~1. The same
    density with its spread multiplied by 1.5 or 0.5 is scaled back by ~1/1.5 or ~2."""
    rng = np.random.default_rng(5)
    mixing = rng.normal(size=(3, 16))
    codes = 1.0 + rng.normal(size=(2000, 3)) @ mixing
    held_out = 1.0 + rng.normal(size=(1000, 3)) @ mixing
    fitted = fit_second_stage(codes, SHAPES, dims=8, components=1)
    assert calibrated(fitted, codes, held_out).spread == pytest.approx(1.0, abs=0.08)
    for wrong in (1.5, 0.5):
        off = replace(fitted, cholesky=fitted.cholesky * wrong)
        fixed = calibrated(off, codes, held_out)
        assert fixed.spread * wrong == pytest.approx(1.0, abs=0.08)
        torch.testing.assert_close(fixed.cholesky, off.cholesky * fixed.spread)
    with pytest.raises(InputError, match="held_out"):
        calibrated(fitted, codes, held_out[:, :15])


def test_projection_onto_the_span_keeps_its_codes_and_drops_what_lies_off_it():
    """numpy's least squares on the span's directions as the oracle."""
    rng = np.random.default_rng(6)
    codes = rng.normal(size=(300, 4)) @ rng.normal(size=(4, 16))
    fitted = fit_second_stage(codes, SHAPES, dims=4, components=1)
    np.testing.assert_allclose(flat(fitted.project(torch.as_tensor(codes))), codes, atol=1e-4)
    new = rng.normal(size=(5, 16))
    basis = fitted.directions.numpy().T
    mean = fitted.mean.numpy()
    expected = mean + (basis @ np.linalg.lstsq(basis, (new - mean).T, rcond=None)[0]).T
    np.testing.assert_allclose(flat(fitted.project(torch.as_tensor(new))), expected,
                               atol=1e-4)
