"""The detail model (models.detail): its sampler against an analytic truth, its fit against a
known generating process, and its place in the second stage's draws and cache."""

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

from pathanat.errors import InputError
from pathanat.models.detail import (
    ddim,
    decode_draws,
    fit_denoiser,
    fit_detail,
    last_states,
    noise_level,
)
from pathanat.models.second_stage import from_state, to_state


def exact_noise_of_gaussian(mean: torch.Tensor, std: float):
    """The exact E[noise | x_t] when x_0 ~ N(mean, std^2) per element: the posterior of a
    Gaussian under x_t = sqrt(a) x_0 + sqrt(1 - a) noise."""
    def predict(x, t):
        a = noise_level(t)[:, None, None, None]
        return (1 - a).sqrt() * (x - a.sqrt() * mean) / (a * std ** 2 + 1 - a)
    return predict


def test_ddim_with_the_exact_denoiser_of_a_gaussian_draws_that_gaussian():
    """The probability flow maps noise onto the data distribution; DDIM is its discretisation,
    so with the exact denoiser its draws have the data's mean and spread, ever closer with more
    steps."""
    mean, std = torch.linspace(-2, 2, 64).reshape(1, 1, 8, 8), 0.5
    errors = []
    for steps in (10, 25, 50):
        x = ddim(exact_noise_of_gaussian(mean, std), (4000, 1, 8, 8), steps,
                 torch.Generator().manual_seed(1))
        np.testing.assert_allclose(x.mean(0), mean[0], atol=0.06)
        errors.append(float((x.std(0) / std - 1).abs().max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < 0.08 and errors[2] < 0.05  # 25 steps (drawn with) within 8%


def test_ddim_clips_what_it_draws():
    """A denoiser that predicts no noise claims x_t is all signal: without the clip the draws
    would be the starting noise scaled up by 1/sqrt(alpha_bar) ~ 10^3."""
    x = ddim(lambda x, t: torch.zeros_like(x), (256, 1, 4, 4), 25,
             torch.Generator().manual_seed(0))
    assert x.abs().max() <= 4.0
    with pytest.raises(InputError, match="steps"):
        ddim(lambda x, t: x, (2, 1, 4, 4), 0)


def smooth_fields(n: int, seed: int) -> torch.Tensor:
    """(n, 1, 16, 16) random smooth fields of unit spread."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, 4, 4, generator=g)
    field = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear",
                                           align_corners=False)
    return field / field.std()


def test_a_fitted_denoiser_draws_what_its_condition_determines_on_new_conditions():
    """Targets that are their condition's first channel plus 0.2 independent noise: the fitted
    model's draws for conditions it never saw follow those conditions (correlation near
    1 / sqrt(1 + 0.04) = 0.98) with the targets' spread, and do not follow a shuffled pairing."""
    condition = torch.cat([smooth_fields(256, 0), torch.ones(256, 1, 16, 16)], 1)
    target = condition[:, :1] + 0.2 * torch.randn(256, 1, 16, 16,
                                                  generator=torch.Generator().manual_seed(9))
    target = target / target.std()
    net = fit_denoiser(target, condition, steps=200, seed=0)
    new = torch.cat([smooth_fields(64, 1), torch.ones(64, 1, 16, 16)], 1)
    drawn = ddim(lambda x, t: net(x, new, t), (64, 1, 16, 16), 25,
                 torch.Generator().manual_seed(2))
    follows = np.corrcoef(drawn.flatten(), new[:, :1].flatten())[0, 1]
    shuffled = np.corrcoef(drawn.flatten(), new[torch.arange(64).roll(1), :1].flatten())[0, 1]
    assert follows > 0.9 and abs(shuffled) < 0.3
    assert 0.8 < float(drawn.std()) < 1.2


def test_fit_denoiser_names_mismatched_shapes():
    with pytest.raises(InputError, match=r"targets .* conditions"):
        fit_denoiser(torch.zeros(4, 1, 8, 8), torch.zeros(3, 2, 8, 8), steps=1)


@pytest.fixture(scope="module")
def detailed(tiny_run):
    """The tiny run's model, its second-stage prior (uncalibrated, 8 directions) with a detail
    model of 30 steps, and its training slices."""
    from pathanat.models.second_stage import fit_second_stage, model_codes
    from pathanat.runs import open_run

    opened = open_run(tiny_run)
    images = opened.cache.split("train").image
    codes, shapes = model_codes(opened.model, images)
    # fewer directions than codes, so that the training codes have detail off the span
    prior = fit_second_stage(codes, shapes, dims=8)
    with pytest.raises(InputError, match="holds all 24 training codes"):
        fit_detail(opened.model, fit_second_stage(codes, shapes), images, steps=1)
    return opened.model, fit_detail(opened.model, prior, images, steps=30), images


def test_drawn_detail_changes_the_last_group_alone_and_survives_saving(detailed, tmp_path):
    model, prior, images = detailed
    size = tuple(images.shape[1:])
    draws = prior.draw(6, generator=torch.Generator().manual_seed(0))
    plain = model.from_residuals(draws, size)
    assert torch.equal(decode_draws(model, prior, draws, size, with_detail=False).x_mean,
                       plain.x_mean)
    with_detail = decode_draws(model, prior, draws, size)
    assert with_detail.x_mean.shape == plain.x_mean.shape
    assert torch.isfinite(with_detail.x_mean).all()
    for own, drawn in zip(plain.z[:-1], with_detail.z[:-1], strict=True):
        assert torch.equal(own, drawn)
    assert not torch.allclose(plain.z[-1], with_detail.z[-1])
    assert not torch.allclose(plain.x_mean, with_detail.x_mean)
    # the stored form reads back with plain-tensor loading and draws the same detail
    path = tmp_path / "prior.pt"
    torch.save(to_state(prior), path)
    back = from_state(torch.load(path, weights_only=True))
    again = [decode_draws(p, q, draws, size, generator=torch.Generator().manual_seed(5)).x_mean
             for p, q in ((model, prior), (model, back))]
    assert torch.equal(again[0], again[1])
    assert replace(back, detail=None).detail is None


def test_the_detail_model_is_fitted_on_the_condition_it_is_drawn_with(detailed):
    """Fitting reads the decoder state at the last group with ``last_states``, drawing through
    ``from_residuals``' hook: for the same codes they must be the same tensor."""
    model, prior, images = detailed
    draws = prior.draw(3, generator=torch.Generator().manual_seed(1))
    size = tuple(images.shape[1:])
    seen = []
    model.from_residuals(draws, size, last=lambda state, r: seen.append(state) or r)
    np.testing.assert_allclose(last_states(model, draws, size), seen[0].float(), rtol=1e-6)


def test_the_run_fits_its_detail_model_once_and_keeps_the_density_when_steps_change(
        tiny_run, tmp_path, monkeypatch):
    """RUN/config.yaml's second_stage section decides the detail model of a trained run, and
    the run's file caches the density beside it: asking for a detail model fits only that (here
    a stand-in, since the tiny run's span holds all its codes), asking again fits nothing, and
    asking for none gives the density alone."""
    import pathanat.runs
    from pathanat.config import read_yaml
    from pathanat.errors import ConfigError
    from pathanat.runs import SECOND_STAGE_FILE, open_run

    fitted = []

    def stand_in(model, prior, images, steps, seed=0, progress=False):
        fitted.append(steps)
        return replace(prior, detail={"weights": {}, "scale": 1.0, "condition_channels": 1,
                                      "steps": steps})

    def ask(steps):
        said = read_yaml(run / "config.yaml")
        said["second_stage"] = {"detail_steps": steps}
        (run / "config.yaml").write_text(yaml.safe_dump(said))
        return open_run(run).second_stage()

    monkeypatch.setattr(pathanat.runs, "fit_detail", stand_in)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(SECOND_STAGE_FILE))
    plain = open_run(run).second_stage()
    assert plain.detail is None
    first = ask(12)
    assert first.detail["steps"] == 12 and fitted == [12]
    assert torch.equal(first.means, plain.means)  # the density is read back, not refitted
    stored = run / SECOND_STAGE_FILE
    written = stored.stat().st_mtime_ns
    assert ask(12).detail["steps"] == 12
    assert fitted == [12] and stored.stat().st_mtime_ns == written
    assert ask(20).detail["steps"] == 20 and fitted == [12, 20]
    again = ask(0)
    assert again.detail is None and torch.equal(again.means, plain.means)
    with pytest.raises(ConfigError, match=r"config\.yaml: second_stage\.detail_steps"):
        ask(-3)
