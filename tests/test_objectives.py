"""KL annealing, KL balancing, supervision loss and the loss assembly against hand computations."""

import math

import numpy as np
import pytest
import torch

from pathanat.models import HierarchicalVAE, HVAEConfig, objectives
from pathanat.models.distributions import sum_per_sample


def test_cyclical_kl_weight_rises_linearly_then_holds_then_restarts():
    cycle, start = 10_000, 2e-7
    rise = int(objectives.RISE_FRACTION * cycle)
    assert objectives.kl_weight(0) == pytest.approx(start)
    assert objectives.kl_weight(rise // 2) == pytest.approx(start + (1 - start) / 2)
    assert objectives.kl_weight(rise) == 1.0
    assert objectives.kl_weight(cycle - 1) == 1.0
    assert objectives.kl_weight(cycle) == pytest.approx(start)
    assert objectives.kl_weight(cycle + rise // 4) == pytest.approx(start + (1 - start) / 4)
    weights = [objectives.kl_weight(s) for s in range(0, rise, 97)]
    assert np.all(np.diff(weights) > 0)
    with pytest.raises(ValueError, match="cycle"):
        objectives.kl_weight(5, cycle=0)


def test_kl_balance_coefficients_equalise_kl_per_element_not_total_kl():
    # groups of very different sizes with the same KL per element get the same coefficient
    sizes = torch.tensor([84.0, 336.0, 21504.0])
    same = (torch.tensor([[0.5, 0.5, 0.5], [1.5, 1.5, 1.5]]) * sizes).requires_grad_()
    got = objectives.kl_balance_coefficients(same, sizes)
    np.testing.assert_allclose(got.numpy(), [1.0, 1.0, 1.0], rtol=1e-6)
    assert not got.requires_grad
    # a collapsed group (KL 0) is penalised least, the busiest group per element most; a group
    # whose KL per element is 3x another's is charged close to 3x as much (the floor aside)
    kl = torch.tensor([[0.0, 1.0 * 336, 3.0 * 21504]])
    c = objectives.kl_balance_coefficients(kl, sizes)
    assert c[0] < c[1] < c[2]
    assert c[0] / c[2] < 0.01
    assert 2.9 < (c[2] / c[1]).item() < 3.0
    assert c.mean().item() == pytest.approx(1.0)


def test_supervision_loss_matches_hand_formulas():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    p = 1 / (1 + np.exp(-logits.numpy().ravel()))
    t = mask.numpy().ravel()
    bce = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    assert objectives.supervision_loss(logits, mask).item() == pytest.approx(bce + dice, rel=1e-5)
    perfect = objectives.soft_dice_loss(100 * (2 * mask - 1), mask)
    assert perfect.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ"):
        objectives.supervision_loss(logits, mask[..., :1])


def test_training_loss_assembles_terms_per_dimension():
    torch.manual_seed(0)
    model = HierarchicalVAE(
        HVAEConfig(
            kind="nvmp+",
            image_size=(32, 32),
            width=8,
            cells_per_scale=1,
            supervised=True,
            pseudo_inputs=2,
        )
    )
    x = torch.randn(3, 1, 32, 32)
    mask = (torch.rand(3, 1, 32, 32) > 0.9).float()
    out = model(x)
    terms = objectives.elbo_terms(out, x, "nvmp+")
    sizes = objectives.group_sizes(out)
    assert sizes.tolist() == [2 * 2 * 2, 2 * 4 * 4, 2 * 8 * 8, 2 * 16 * 16, 2 * 32 * 32]
    beta, lam = 0.3, 0.5
    loss = objectives.training_loss(terms, sizes, beta, True, out.seg_logits, mask, lam)
    c = objectives.kl_balance_coefficients(terms.kl, sizes)
    kl = (terms.kl * c).sum(1) + terms.kl_extra.sum(1)
    expected = ((-terms.log_px + beta * kl) / 1024).mean() + lam * objectives.supervision_loss(
        out.seg_logits, mask
    ).mean()
    assert loss.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # at full KL weight the balancing is off: all coefficients are 1
    full = objectives.training_loss(terms, sizes, 1.0)
    assert torch.equal(full.coefficients, torch.ones(5))
    assert terms.elbo.shape == (3,)
    assert torch.allclose(terms.elbo, terms.log_px - terms.kl.sum(1))


def test_likelihood_is_gaussian_log_density():
    x = torch.randn(2, 1, 4, 4)
    mean, log_scale = torch.zeros_like(x), torch.full_like(x, math.log(2.0))
    got = objectives.gaussian_log_likelihood(x, mean, log_scale)
    from scipy.stats import norm

    expected = norm.logpdf(x.numpy(), 0.0, 2.0).reshape(2, -1).sum(1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_group_kl_uses_analytic_forms_where_they_exist():
    """vae: every group is KL[q || N(0, I)]; nvae at l > 0: eq. 4 on the pass's own deltas."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    for kind in ("vae", "nvae"):
        model = HierarchicalVAE(HVAEConfig(kind=kind, image_size=(32, 32), width=8))
        out = model(x)
        kl = objectives.group_kl(out)
        for level, g in enumerate(out.groups):
            mu, sigma = g.posterior.mu, g.posterior.sigma
            if kind == "vae" or level == 0:
                by_hand = 0.5 * (sigma**2 + mu**2 - 1) - torch.log(sigma)
            else:
                p = g.prior
                by_hand = (
                    torch.log(p.sigma / sigma)
                    + (sigma**2 + (mu - p.mu) ** 2) / (2 * p.sigma**2)
                    - 0.5
                )
            assert torch.allclose(kl[:, level], sum_per_sample(by_hand), rtol=1e-4, atol=1e-3)


def test_kl_scale_multiplies_the_kl_weight_the_annealing_reaches():
    """At full KL weight, kl_scale s is a beta-VAE's beta: the loss with (beta 1, s 3) equals the
    loss with (beta 3, s 1) without balancing, and both exceed the ELBO's by 2 x KL / D."""
    torch.manual_seed(0)
    model = HierarchicalVAE(HVAEConfig(kind="nvae", image_size=(16, 16), levels=2, width=8,
                                       cells_per_scale=1))
    x = torch.randn(2, 1, 16, 16)
    out = model(x)
    terms, sizes = objectives.elbo_terms(out, x, "nvae"), objectives.group_sizes(out)
    scaled = objectives.training_loss(terms, sizes, 1.0, kl_scale=3.0).loss
    beta3 = objectives.training_loss(terms, sizes, 3.0, balance=False).loss
    elbo = objectives.training_loss(terms, sizes, 1.0).loss
    assert scaled.item() == pytest.approx(beta3.item(), rel=1e-6)
    kl = terms.kl.sum(1).mean().item() / 256
    assert (scaled - elbo).item() == pytest.approx(2 * kl, rel=1e-3)  # float32 difference


def test_a_per_group_kl_scale_weighs_that_group_alone():
    """kl_scale per group: (1, 1, 4) adds 3 x KL of the finest group per D to the ELBO's loss,
    and nothing of the others'; a wrong count of values is refused."""
    torch.manual_seed(0)
    model = HierarchicalVAE(HVAEConfig(kind="nvmp+", image_size=(16, 16), levels=2, width=8,
                                       cells_per_scale=1, pseudo_inputs=2))
    x = torch.randn(2, 1, 16, 16)
    out = model(x)
    terms, sizes = objectives.elbo_terms(out, x, "nvmp+"), objectives.group_sizes(out)
    fine = objectives.training_loss(terms, sizes, 1.0, kl_scale=(1.0, 1.0, 4.0))
    elbo = objectives.training_loss(terms, sizes, 1.0)
    added = 3 * (terms.kl[:, 2] + terms.kl_extra[:, 1]).mean().item() / 256
    assert (fine.loss - elbo.loss).item() == pytest.approx(added, rel=1e-3)
    assert fine.kl_extra_per_dim.item() == pytest.approx(elbo.kl_extra_per_dim.item())
    with pytest.raises(ValueError, match="kl_scale has 2 values for 3 groups"):
        objectives.training_loss(terms, sizes, 1.0, kl_scale=(1.0, 4.0))


def test_a_heavier_finest_group_carries_less_after_training():
    """Fitting the same images with the finest group's KL weighed 8x leaves less information in
    that group than the ELBO does: the knob moves what it names."""
    images = torch.zeros(8, 1, 16, 16)
    for k, image in enumerate(images):  # bright squares at different places, a little noise
        image[0, 2 + k % 4 * 2:8 + k % 4 * 2, 3 + k // 4 * 5:9 + k // 4 * 5] = 1.0
    images += 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    finest_kl = []
    for scale in ((1.0, 1.0, 1.0), (1.0, 1.0, 8.0)):
        torch.manual_seed(0)
        model = HierarchicalVAE(HVAEConfig(kind="nvae", image_size=(16, 16), levels=2, width=8,
                                           cells_per_scale=1))
        optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(150):
            out = model(images)
            terms = objectives.elbo_terms(out, images, "nvae")
            loss = objectives.training_loss(terms, objectives.group_sizes(out), 1.0,
                                            balance=False, kl_scale=scale).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            out = model(images)
            finest_kl.append(objectives.elbo_terms(out, images, "nvae").kl[:, 2].mean().item())
    assert finest_kl[1] < 0.5 * finest_kl[0], finest_kl
