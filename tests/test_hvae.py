"""The four hierarchical VAEs: structure per kind, shapes, synthesis, IW likelihood, overfitting."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pathanat.config import from_dict
from pathanat.errors import ConfigError, InputError, PathanatError
from pathanat.models import KINDS, HierarchicalVAE, HVAEConfig, objectives
from pathanat.models.edit import mix, resample

SMALL = dict(image_size=(48, 56), width=8, cells_per_scale=1, pseudo_inputs=3)


@pytest.fixture(scope="module")
def phantom_slices() -> torch.Tensor:
    """Four axial slices of two MS phantom subjects, pooled to 4 mm: 48 x 56, standardised."""
    from pathanat.data.phantom import make_subject

    slabs = [make_subject("ms", i, cohort_seed=0, slab_mm=8.0).image for i in (0, 1)]
    slices = np.stack([slab[:, :, k] for slab in slabs for k in (2, 6)])
    x = F.avg_pool2d(torch.tensor(slices, dtype=torch.float32)[:, None], 4)[..., :48, 1:57]
    return (x - x.mean()) / x.std()


def small_model(kind: str, seed: int = 0, **overrides) -> HierarchicalVAE:
    torch.manual_seed(seed)
    return HierarchicalVAE(HVAEConfig(kind=kind, **{**SMALL, **overrides}))


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10((x.max() - x.min()) ** 2 / ((x - y) ** 2).mean()))


# ---- structure per kind ------------------------------------------------------------------------


def test_group_shapes_and_outputs_for_96x112():
    model = HierarchicalVAE(HVAEConfig(kind="nvae", width=8, cells_per_scale=1, supervised=True))
    x = torch.randn(2, 1, 96, 112)
    out = model(x)
    expected = [(2, 2, 6, 7), (2, 2, 12, 14), (2, 2, 24, 28), (2, 2, 48, 56), (2, 2, 96, 112)]
    assert [tuple(g.z.shape) for g in out.groups] == expected
    assert out.x_mean.shape == out.x_log_scale.shape == out.seg_logits.shape == x.shape
    assert model.group_shapes((96, 112)) == [s[1:] for s in expected]


def test_fine_groups_add_groups_at_full_resolution_each_drawn_given_those_before():
    model = HierarchicalVAE(HVAEConfig(kind="nvae", width=8, cells_per_scale=1, fine_groups=3))
    expected = [(2, 6, 7), (2, 12, 14), (2, 24, 28), (2, 48, 56)] + [(2, 96, 112)] * 3
    assert model.group_shapes((96, 112)) == expected
    assert [tuple(g.z.shape[1:]) for g in model(torch.randn(2, 1, 96, 112)).groups] == expected
    # the prior of each later group follows the values drawn before it, and only those
    fixed = [torch.randn(1, *shape) for shape in expected]

    def priors_given(z4: torch.Tensor) -> list:
        seen = []

        def choose(level, prior, state):
            seen.append(prior)
            return z4 if level == 4 else fixed[level]

        model.generate(1, (96, 112), choose)
        return seen

    one, other = priors_given(fixed[4]), priors_given(fixed[4] + 1)
    for level in range(1, 7):
        same = torch.equal(one[level].mu, other[level].mu)
        assert same == (level <= 4), level


@pytest.mark.parametrize("kind", ["vae", "nvae"])
def test_non_multiple_of_16_input_round_trips_to_its_shape(kind):
    model = small_model(kind, supervised=True)
    x = torch.randn(2, 1, 50, 61)
    out = model(x)
    assert out.x_mean.shape == out.seg_logits.shape == x.shape
    assert out.groups[0].z.shape[-2:] == (4, 4)  # padded to 64 x 64
    assert model.reconstruct(x).shape == x.shape
    assert resample(model, x, keep={1}).x_mean.shape == x.shape


def test_parameters_differ_only_by_what_a_kind_needs():
    counts = {kind: small_model(kind).num_parameters() for kind in KINDS}
    nvae = small_model("nvae")
    prior_heads = sum(p.numel() for p in nvae.decoder.prior_heads.parameters())
    # the joint posterior's delta heads of z_1..z_L also read the decoder state: one more
    # width-channel input per 3x3 head conv (mean and log-scale) of each of those groups
    width, channels, levels = SMALL["width"], nvae.config.latent_channels, nvae.config.levels
    state_inputs = levels * 2 * (width * channels * 9)
    assert counts["nvae"] == counts["vae"] + prior_heads + state_inputs
    assert small_model("nvae", posterior="encoder").num_parameters() == counts["vae"] + prior_heads
    pseudo = 3 * 48 * 56
    assert counts["nvmp"] == counts["nvmp+"] == counts["nvae"] + pseudo


def test_only_vamp_kinds_have_pseudo_inputs_and_their_gradient_reaches_them(phantom_slices):
    for kind in KINDS:
        model = small_model(kind)
        names = [name for name, _ in model.named_parameters()]
        if kind in ("vae", "nvae"):
            assert model.pseudo_inputs is None and not any("pseudo" in n for n in names)
            continue
        out = model(phantom_slices)
        loss = objectives.training_loss(
            objectives.elbo_terms(out, phantom_slices, kind), objectives.group_sizes(out), beta=1.0
        ).loss
        loss.backward()
        assert model.pseudo_inputs.grad is not None
        assert model.pseudo_inputs.grad.abs().sum() > 0


def test_vae_posterior_ignores_decoder_weights_and_nvae_does_not(phantom_slices):
    for kind in ("vae", "nvae"):
        model = small_model(kind)
        before = model.encode(phantom_slices).posteriors
        with torch.no_grad():
            for p in model.decoder.parameters():
                p.add_(0.3 * torch.randn_like(p))
        after = model.encode(phantom_slices).posteriors
        same = [
            torch.equal(a.mu, b.mu) and torch.equal(a.log_sigma, b.log_sigma)
            for a, b in zip(before, after, strict=True)
        ]
        if kind == "vae":
            assert all(same)
        else:
            assert same[0] and not any(same[1:])  # z_0 is encoder-only in every kind


def test_extra_kl_only_for_nvmp_plus(phantom_slices):
    for kind in KINDS:
        terms = objectives.elbo_terms(small_model(kind)(phantom_slices), phantom_slices, kind)
        assert terms.kl.shape == (4, 5) and torch.isfinite(terms.kl).all()
        if kind == "nvmp+":
            assert terms.kl_extra.shape == (4, 4) and torch.isfinite(terms.kl_extra).all()
        else:
            assert terms.kl_extra is None


def test_segmentation_head_sees_only_z_p():
    model = small_model("nvae", supervised=True)
    z = model.sample(2).z
    base = model.decode(z).seg_logits
    for level in range(5):
        changed = [t.clone() for t in z]
        changed[level] = changed[level] + torch.randn_like(changed[level])
        seg = model.decode(changed).seg_logits
        if level == model.config.z_p:
            assert not torch.allclose(seg, base)
        else:
            assert torch.equal(seg, base)


# ---- synthesis API -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_resample_and_mix_keep_what_they_are_told(kind, phantom_slices):
    model = small_model(kind)
    x_a, x_b = phantom_slices[:2], phantom_slices[2:]
    enc = model.encode(x_a)
    recon = model.reconstruct(x_a)
    for mode in ("value", "residual"):
        assert torch.allclose(resample(model, x_a, keep=range(5), mode=mode).x_mean, recon)
        assert torch.allclose(mix(model, x_a, x_b, from_a=range(5), mode=mode).x_mean, recon)
        assert torch.allclose(
            mix(model, x_a, x_b, from_a=[], mode=mode).x_mean, model.reconstruct(x_b)
        )
    partial = resample(model, x_a, keep={0, 2}, mode="value")
    assert torch.equal(partial.z[0], enc.z[0]) and torch.equal(partial.z[2], enc.z[2])
    assert not torch.allclose(partial.z[1], enc.z[1])
    # residual mode: z_0 is resampled, so a kept residual group moves with its new prior
    moved = resample(model, x_a, keep={3, 4}, mode="residual")
    if kind == "vae":  # fixed N(0, I) priors: the residual is the value
        assert torch.equal(moved.z[3], enc.z[3])
    else:
        assert not torch.allclose(moved.z[3], enc.z[3])


def test_resample_and_mix_index_every_group_of_a_model_with_fine_groups(phantom_slices):
    model = small_model("nvmp", fine_groups=2)  # 6 groups: z_0..z_4 one per scale, z_5 at z_4's
    x_a, x_b = phantom_slices[:2], phantom_slices[2:]
    recon = model.reconstruct(x_a)
    assert torch.allclose(resample(model, x_a, keep=range(6)).x_mean, recon)
    assert torch.allclose(mix(model, x_a, x_b, from_a=range(6)).x_mean, recon)
    assert not torch.allclose(resample(model, x_a, keep=range(5)).x_mean, recon)
    with pytest.raises(PathanatError, match=r"resample keep: expected group indices in 0\.\.5"):
        resample(model, x_a, keep={6})


def test_residual_mode_keeps_standardised_residual():
    """Re-encoding the residual-mode result's own top-down pass gives back the kept residual."""
    model = small_model("nvae")
    x = torch.randn(2, 1, 48, 56)
    enc = model.encode(x)
    out = resample(model, x, keep={4}, mode="residual")
    priors = []

    def choose(level, prior, state):
        priors.append(prior)
        return out.z[level]

    model._top_down(2, model.padded_size((48, 56)), choose)
    assert torch.allclose(priors[4].standardise(out.z[4]), enc.residuals[4], atol=1e-4)


def test_prior_sampling_temperature_zero_is_deterministic_and_shapes():
    for kind in ("vae", "nvae"):
        model = small_model(kind)
        a, b = model.sample(3, temperature=0.0), model.sample(3, temperature=0.0)
        assert torch.equal(a.x_mean, b.x_mean)
        assert a.x_mean.shape == (3, 1, 48, 56)
    vamp = small_model("nvmp").sample(2)
    assert vamp.x_mean.shape == (2, 1, 48, 56) and torch.isfinite(vamp.x_mean).all()


# ---- validation and numerics ---------------------------------------------------------------------


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.kind"):
        HVAEConfig(kind="nvmp++")
    with pytest.raises(ConfigError, match=r"model\.z_p"):
        HVAEConfig(z_p=5)
    with pytest.raises(ConfigError, match=r"model\.width"):
        HVAEConfig(width=0)
    with pytest.raises(ConfigError, match=r"model\.fine_groups"):
        HVAEConfig(fine_groups=0)
    with pytest.raises(ConfigError, match=r"model\.unconditional_prior"):
        HVAEConfig(unconditional_prior="vamp")
    with pytest.raises(ConfigError, match="widht"):
        from_dict(HVAEConfig, {"widht": 16})
    config = from_dict(HVAEConfig, {"kind": "nvmp+", "image_size": [64, 80]})
    assert config.kind == "nvmp+" and config.image_size == (64, 80)


def test_input_errors():
    with pytest.raises(InputError, match="shape"):
        small_model("vae")(torch.randn(2, 3, 48, 56))
    with pytest.raises(InputError, match="pseudo-inputs"):
        small_model("nvmp")(torch.randn(2, 1, 96, 112))
    with pytest.raises(InputError, match="z_0 has a prior fitted at"):
        small_model("nvae", unconditional_prior="fitted").sample(1, size=(96, 112))
    with pytest.raises(InputError, match="z_1 has a prior fitted at"):
        small_model("nvae", conditional_prior="recentred").sample(1, size=(96, 112))


@pytest.mark.parametrize("kind", KINDS)
def test_losses_stay_finite_for_extreme_inputs(kind):
    model = small_model(kind)
    x = 1e4 * torch.randn(2, 1, 48, 56)
    out = model(x)
    terms = objectives.elbo_terms(out, x, kind)
    loss = objectives.training_loss(terms, objectives.group_sizes(out), 1.0)
    assert torch.isfinite(loss.loss)


def test_bf16_autocast_channels_last_keeps_densities_in_float32(phantom_slices):
    model = small_model("nvmp+").to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(phantom_slices)
        terms = objectives.elbo_terms(out, phantom_slices, "nvmp+")
    assert out.groups[4].posterior.mu.dtype == torch.float32
    assert terms.kl.dtype == terms.log_px.dtype == torch.float32
    assert out.x_mean.dtype == torch.float32
    assert torch.isfinite(terms.kl).all() and torch.isfinite(terms.kl_extra).all()
    # the full-resolution latent stays channels_last
    assert out.groups[4].z.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model.reconstruct(phantom_slices)
    assert psnr(model.reconstruct(phantom_slices), fast) > 30.0


# ---- importance-weighted likelihood --------------------------------------------------------------


@pytest.mark.parametrize("kind, fine_groups", [("vae", 1), ("nvae", 1), ("nvmp", 1), ("nvae", 2)])
def test_iw_nll_is_below_negative_elbo_and_tightens_with_samples(kind, fine_groups,
                                                                  phantom_slices):
    model = small_model(kind, fine_groups=fine_groups)
    x = phantom_slices[:2]
    torch.manual_seed(0)
    with torch.no_grad():
        repeats = 100
        out = model(x.repeat(repeats, 1, 1, 1))
        neg_elbo = -objectives.elbo_terms(out, x.repeat(repeats, 1, 1, 1), kind).elbo.view(
            repeats, 2)
    neg_elbo_mean, neg_elbo_se = neg_elbo.mean(0), neg_elbo.std(0) / repeats**0.5
    nll = {}
    for samples, runs in ((1, 40), (8, 8), (64, 2)):
        estimates = torch.stack(
            [
                -model.importance_weighted_log_likelihood(x, samples, chunk_size=32)
                for _ in range(runs)
            ]
        )
        nll[samples] = estimates.mean(0)
    for samples, value in nll.items():
        assert torch.all(value <= neg_elbo_mean + 4 * neg_elbo_se + 1e-3), (samples, value)
    # S = 1 is the one-sample ELBO: the same expectation as the objective's -ELBO
    se_1 = neg_elbo.std(0) / 40**0.5
    assert torch.all((nll[1] - neg_elbo_mean).abs() < 4 * (neg_elbo_se + se_1))
    assert torch.all(nll[64] < nll[8]) and torch.all(nll[8] < nll[1])


# ---- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_overfits_phantom_slices(kind, phantom_slices, capsys):
    model = small_model(kind, width=16)
    if model.pseudo_inputs is not None:
        model.init_pseudo_inputs(phantom_slices)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(150):
        out = model(phantom_slices)
        terms = objectives.elbo_terms(out, phantom_slices, kind)
        loss = objectives.training_loss(
            terms, objectives.group_sizes(out), objectives.kl_weight(step)
        ).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimiser.step()
        losses.append(loss.item())
    reached = psnr(phantom_slices, model.reconstruct(phantom_slices))
    with capsys.disabled():
        print(
            f"\n{kind}: loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}, "
            f"PSNR {reached:.1f} dB"
        )
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0
    assert reached > 22.0


# ---- posterior form and per-scale trunks -------------------------------------------------------


def test_joint_posterior_reads_the_decoder_state_encoder_posterior_does_not():
    x = torch.randn(2, 1, 48, 56)
    for posterior, depends in (("joint", True), ("encoder", False)):
        model = small_model("nvae", posterior=posterior)
        features, _ = model._features(model._pad(x))
        state = torch.randn_like(features[1])
        a = model.encoder.delta(1, features[1], state)
        b = model.encoder.delta(1, features[1], state + 1.0)
        assert (not torch.allclose(a.mu, b.mu)) is depends, posterior
        # z_0 reads the image alone in both forms
        c = model.encoder.delta(0, features[0], torch.randn_like(features[0]))
        d = model.encoder.delta(0, features[0], torch.randn_like(features[0]))
        assert torch.equal(c.mu, d.mu)


def test_nvmp_plus_components_follow_the_decoder_only_with_a_joint_posterior():
    for posterior, moves in (("joint", True), ("encoder", False)):
        model = small_model("nvmp+", posterior=posterior)
        before = model.pseudo_components()
        with torch.no_grad():
            model.decoder.start.add_(1.0)  # a different decoder state for every pseudo-input
        after = model.pseudo_components()
        assert torch.equal(before[0].mu, after[0].mu)  # z_0's component: the image alone
        assert (not torch.allclose(before[2].mu, after[2].mu)) is moves, posterior
    assert len(small_model("nvmp").pseudo_components()) == 1  # nvmp's prior uses z_0's only


def test_per_scale_widths_and_cells_shape_the_trunks():
    model = small_model("nvae", widths=(32, 24, 16, 8, 8), cells=(3, 2, 1, 1, 0))
    assert [len(s) for s in model.encoder.stacks] == [3, 2, 1, 1, 0]
    assert model.decoder.start.shape[1] == 32 and model.decoder.out.in_channels == 8
    x = torch.randn(2, 1, 48, 56)
    out = model(x)
    assert out.x_mean.shape == x.shape
    shapes = model.group_shapes((48, 56))
    assert [tuple(g.z.shape[1:]) for g in out.groups] == [(2, *s[1:]) for s in shapes]
    assert torch.isfinite(model.importance_weighted_log_likelihood(x, samples=3)).all()
    for bad in ((16, 8), (16, 8, 8, 8, 0), (16, 8, 8, 8, True)):
        with pytest.raises(ConfigError, match=r"model\.widths"):
            small_model("nvae", widths=bad)
    with pytest.raises(ConfigError, match=r"model\.cells"):
        small_model("nvae", cells=(1, 1, -1, 1, 1))
    with pytest.raises(ConfigError, match=r"model\.posterior"):
        small_model("nvae", posterior="decoder")


def test_a_state_dict_with_separate_mean_and_log_scale_heads_loads(phantom_slices):
    """Checkpoints written before the heads were merged keep two convs per head."""
    model = small_model("nvmp+", posterior="joint")
    old = {}
    for key, value in model.state_dict().items():
        if ".conv." in key and ("heads" in key):
            head, name = key.rsplit(".conv.", 1)
            mu, log_sigma = value.chunk(2, dim=0)
            old[f"{head}.mu.{name}"], old[f"{head}.log_sigma.{name}"] = mu, log_sigma
        else:
            old[key] = value
    fresh = small_model("nvmp+", seed=1, posterior="joint")
    fresh.load_state_dict(old)
    torch.manual_seed(0)
    a = model(phantom_slices)
    torch.manual_seed(0)
    b = fresh(phantom_slices)
    torch.testing.assert_close(a.x_mean, b.x_mean, rtol=0, atol=0)
    for ga, gb in zip(a.groups, b.groups, strict=True):
        torch.testing.assert_close(ga.posterior.log_sigma, gb.posterior.log_sigma, rtol=0, atol=0)


# ---- fitted unconditional priors -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vae", "nvae"])
def test_a_fitted_prior_starts_as_n01_where_the_kind_has_an_unconditional_prior(
    kind, phantom_slices
):
    standard = small_model(kind)
    fitted = small_model(kind, unconditional_prior="fitted")
    missing, unexpected = fitted.load_state_dict(standard.state_dict(), strict=False)
    assert not unexpected
    levels = range(5) if kind == "vae" else [0]  # every group of vae, z_0 of nvae
    assert sorted(missing) == sorted(
        f"decoder.fitted_priors.{level}.{moment}" for level in levels
        for moment in ("first", "second")
    )
    torch.manual_seed(2)
    a = standard.sample(2).x_mean
    torch.manual_seed(2)
    torch.testing.assert_close(fitted.sample(2).x_mean, a)
    x = phantom_slices[:2]
    torch.manual_seed(1)
    kl_standard = objectives.elbo_terms(standard(x), x, kind).kl
    torch.manual_seed(1)  # a training pass: its KL is against the prior before it is updated
    kl_fitted = objectives.elbo_terms(fitted(x), x, kind).kl
    torch.testing.assert_close(kl_fitted, kl_standard)
    assert not small_model("nvmp", unconditional_prior="fitted").decoder.fitted_priors


def test_a_fitted_prior_converges_to_the_gaussian_closest_to_the_posteriors(phantom_slices):
    """Over fixed posteriors N(mu_x, s_x^2), the Gaussian minimising the mean KL to it has mean
    E[mu_x] and variance E[s_x^2] + Var[mu_x]; checked as that value and as a minimum."""
    model = small_model("vae", unconditional_prior="fitted")
    with torch.no_grad():  # posteriors that differ from image to image and from N(0, I)
        head = model.encoder.heads[0].conv
        head.weight.mul_(20.0)
        head.bias.add_(0.5)
    x = phantom_slices
    model.eval()
    before = model(x).groups[0].prior
    model.train()
    for _ in range(400):  # vae's posteriors read the encoder only: the same every pass
        q = model(x).groups[0].posterior
    model.eval()
    p = model(x).groups[0].prior
    torch.testing.assert_close(before.mu, torch.zeros_like(before.mu))  # eval passes fit nothing
    assert float(q.mu.std(0).mean()) > 0.1  # the images' posteriors do differ
    torch.testing.assert_close(p.mu[0], q.mu.mean(0), atol=1e-5, rtol=0)
    variance = (q.sigma**2).mean(0) + q.mu.var(0, unbiased=False)
    torch.testing.assert_close(p.sigma[0], variance.sqrt(), atol=1e-5, rtol=1e-4)

    def mean_kl(mu, log_sigma):
        prior = type(p)(mu.expand_as(q.mu), log_sigma.expand_as(q.mu))
        return float(q.kl(prior).sum((1, 2, 3)).mean())

    best = mean_kl(p.mu[:1], p.log_sigma[:1])
    for shift, scale in ((0.05, 0.0), (-0.05, 0.0), (0.0, 0.05), (0.0, -0.05)):
        assert mean_kl(p.mu[:1] + shift, p.log_sigma[:1] + scale) > best


def test_a_non_finite_batch_leaves_a_fitted_prior_as_it_was():
    from pathanat.models.distributions import DiagonalGaussian
    from pathanat.models.priors import FittedPrior

    prior = FittedPrior((2, 3, 4))
    prior.update(DiagonalGaussian(torch.ones(5, 2, 3, 4), torch.zeros(5, 2, 3, 4)))
    first, second = prior.first.clone(), prior.second.clone()
    broken = torch.ones(5, 2, 3, 4)
    broken[0, 0, 0, 0] = float("nan")
    prior.update(DiagonalGaussian(broken, torch.zeros(5, 2, 3, 4)))
    assert torch.equal(prior.first, first) and torch.equal(prior.second, second)
    torch.testing.assert_close(first, torch.full_like(first, 0.05))  # 5% of the way to mean 1


# ---- recentred conditional priors ----------------------------------------------------------------


def test_a_recentred_prior_starts_as_the_learned_one_and_never_moves_the_posteriors(
    phantom_slices,
):
    learned = small_model("nvmp")
    recentred = small_model("nvmp", conditional_prior="recentred")
    missing, unexpected = recentred.load_state_dict(learned.state_dict(), strict=False)
    assert not unexpected
    assert sorted(missing) == sorted(f"decoder.recentred_priors.{level}.{moment}"
                                     for level in range(1, 5) for moment in ("first", "second"))
    x = phantom_slices[:2]
    recentred.eval(), learned.eval()
    torch.manual_seed(1)
    kl = objectives.elbo_terms(learned(x), x, "nvmp").kl
    torch.manual_seed(1)
    torch.testing.assert_close(objectives.elbo_terms(recentred(x), x, "nvmp").kl, kl)
    before = recentred.encode(x)
    with torch.no_grad():  # move every prior: the posteriors must not follow
        for prior in recentred.decoder.recentred_priors.values():
            prior.first.fill_(0.7)
            prior.second.fill_(0.7**2 + 0.25)
    after = recentred.encode(x)
    for level in range(1, 5):
        torch.testing.assert_close(after.posteriors[level].mu, before.posteriors[level].mu)
        shift = (after.priors[level].mu - before.priors[level].mu) / before.priors[level].sigma
        torch.testing.assert_close(shift, torch.full_like(shift, 0.7))
        torch.testing.assert_close(after.priors[level].sigma, 0.5 * before.priors[level].sigma)
    assert not small_model("vae", conditional_prior="recentred").decoder.recentred_priors


def test_a_recentred_prior_converges_to_the_affine_correction_closest_to_the_posteriors():
    """Posteriors N(mu_x + dmu_x, (s_x dsig_x)^2) around learned priors N(mu_x, s_x^2) that differ
    from image to image: after many updates, N(mu_x + s_x m, s_x^2 v) has the (m, v) per element
    that minimise the mean KL -- checked as a minimum, by moving either."""
    from pathanat.models.distributions import DiagonalGaussian
    from pathanat.models.priors import RecentredPrior

    g = torch.Generator().manual_seed(0)
    shape = (6, 2, 3, 4)
    learned = DiagonalGaussian(torch.randn(shape, generator=g),
                               0.5 * torch.randn(shape, generator=g))
    delta = DiagonalGaussian(0.8 + torch.randn(shape, generator=g),
                             -0.5 + 0.3 * torch.randn(shape, generator=g))
    posterior = DiagonalGaussian(learned.mu + delta.mu, learned.log_sigma + delta.log_sigma)
    prior = RecentredPrior(shape[1:])
    for _ in range(600):
        prior.update(delta, prior(learned))
    fitted = prior(learned)
    torch.testing.assert_close(prior.learned(fitted).mu, learned.mu, atol=1e-5, rtol=0)
    torch.testing.assert_close(prior.learned(fitted).log_sigma, learned.log_sigma)

    def mean_kl(shift: float, scale: float) -> float:
        moved = DiagonalGaussian(fitted.mu + shift * learned.sigma, fitted.log_sigma + scale)
        return float(posterior.kl(moved).sum((1, 2, 3)).mean())

    best = mean_kl(0.0, 0.0)
    assert best < mean_kl(-1.0, 0.0) - 1.0  # far better than the learned prior's centre
    for shift, scale in ((0.05, 0.0), (-0.05, 0.0), (0.0, 0.05), (0.0, -0.05)):
        assert mean_kl(shift, scale) > best


def test_a_non_finite_batch_leaves_a_recentred_prior_as_it_was():
    from pathanat.models.distributions import DiagonalGaussian
    from pathanat.models.priors import RecentredPrior

    prior = RecentredPrior((2, 3, 4))
    learned = DiagonalGaussian(torch.zeros(5, 2, 3, 4), torch.zeros(5, 2, 3, 4))
    prior.update(DiagonalGaussian(torch.ones(5, 2, 3, 4), torch.zeros(5, 2, 3, 4)), prior(learned))
    first, second = prior.first.clone(), prior.second.clone()
    broken = torch.ones(5, 2, 3, 4)
    broken[0, 0, 0, 0] = float("inf")
    prior.update(DiagonalGaussian(broken, torch.zeros(5, 2, 3, 4)), prior(learned))
    assert torch.equal(prior.first, first) and torch.equal(prior.second, second)


@pytest.mark.parametrize("kind, fine_groups", [(k, 1) for k in KINDS] + [("nvmp+", 3)])
def test_decoding_a_slices_residuals_gives_its_reconstruction(kind, fine_groups):
    """from_residuals re-expresses each residual under the prior its context gives: fed the
    posterior residuals of x, the top-down pass meets the posterior means again."""
    torch.manual_seed(0)
    config = HVAEConfig(kind=kind, image_size=(16, 16), levels=2, width=8, cells_per_scale=1,
                        pseudo_inputs=2, fine_groups=fine_groups)
    model = HierarchicalVAE(config).eval()
    x = torch.randn(3, 1, 16, 16)
    enc = model.encode(x)
    torch.testing.assert_close(model.from_residuals(enc.residuals, (16, 16)).x_mean,
                               model.reconstruct(x), rtol=1e-4, atol=1e-5)
