import numpy as np
import pytest
import torch

from pathanat.errors import InputError
from pathanat.models import HierarchicalVAE, HVAEConfig
from pathanat.models.latent_gaussian import fit_gaussian, fit_latent_gaussian

SHAPES = [(1, 2, 2), (2, 2, 3)]  # 4 + 12 = 16 values per code


def test_draws_have_the_mean_and_covariance_of_the_fitted_codes():
    """Codes from a known rank-3 Gaussian in 16 dimensions: the fit's draws reproduce the codes'
    sample mean and covariance (the fit is the sample moments), and never leave their span."""
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(3, 16))
    codes = 2.0 + rng.normal(size=(400, 3)) @ mixing
    fitted = fit_gaussian(codes, SHAPES)
    assert fitted.rank == 3
    draws = fitted.draw(200_000, generator=torch.Generator().manual_seed(1))
    flat = torch.cat([d.flatten(1) for d in draws], 1).double().numpy()
    assert [tuple(d.shape[1:]) for d in draws] == SHAPES
    np.testing.assert_allclose(flat.mean(0), codes.mean(0), atol=0.03)
    np.testing.assert_allclose(np.cov(flat.T), np.cov(codes.T), atol=0.05 * np.abs(
        np.cov(codes.T)).max())
    # orthogonal to the codes' span: nothing
    _, _, vt = np.linalg.svd(codes - codes.mean(0))
    assert np.abs((flat - codes.mean(0)) @ vt[3:].T).max() < 1e-3
    # temperature 0: the mean
    cold = torch.cat([d.flatten(1) for d in fitted.draw(2, 0.0)], 1).numpy()
    np.testing.assert_allclose(cold, np.repeat(codes.mean(0)[None], 2, 0), rtol=1e-5)


def test_bad_codes_and_draws_are_refused():
    with pytest.raises(InputError, match="codes"):
        fit_gaussian(np.full((5, 16), np.nan), SHAPES)
    with pytest.raises(InputError, match="16 values"):
        fit_gaussian(np.zeros((5, 15)), SHAPES)
    with pytest.raises(InputError, match="n: expected"):
        fit_gaussian(np.random.default_rng(0).normal(size=(5, 16)), SHAPES).draw(0)


def test_a_model_fit_covers_every_group_and_decodes():
    torch.manual_seed(0)
    model = HierarchicalVAE(HVAEConfig(kind="nvae", image_size=(16, 16), levels=2, width=8,
                                       cells_per_scale=1)).eval()
    images = np.random.default_rng(0).normal(size=(20, 16, 16)).astype(np.float32)
    fitted = fit_latent_gaussian(model, images, batch_size=8)
    assert fitted.shapes == model.group_shapes((16, 16)) and fitted.rank <= 19
    out = model.from_residuals(fitted.draw(4), (16, 16))
    assert out.x_mean.shape == (4, 1, 16, 16) and torch.isfinite(out.x_mean).all()
