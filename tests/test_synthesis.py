"""synthesize: the arrays behind each figure against latents assembled by hand, a brute-force
cluster assignment and a planted slice table; the pathology-group resolution order; and
synthesize_run on a copy of the tiny trained run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm

from pathanat.data.prepare import CacheSplit
from pathanat.errors import PathanatError
from pathanat.evaluation.evaluate import prior_samples
from pathanat.evaluation.synthesis import (
    ALL,
    choose_pairs,
    component_log_densities,
    conditional,
    layer_rows,
    pseudo_reconstructions,
    resolve_pathology_groups,
    responsibilities,
    second_stage_given,
    seeded,
    style_mix,
    synthesize_run,
)
from pathanat.models import HierarchicalVAE, HVAEConfig
from pathanat.models.edit import resample
from pathanat.models.second_stage import fit_second_stage, model_codes

SIZE = (32, 32)


def small_model(kind: str = "nvmp") -> HierarchicalVAE:
    torch.manual_seed(0)
    model = HierarchicalVAE(HVAEConfig(kind=kind, image_size=SIZE, width=8, cells_per_scale=1,
                                       pseudo_inputs=4))
    with torch.no_grad():  # a fresh model's heads are scaled down; spread its latents out
        for head in [*model.encoder.heads, *model.decoder.prior_heads]:
            head.conv.weight[: head.conv.out_channels // 2].mul_(20)  # the means
    return model.eval()


@pytest.fixture(scope="module")
def model() -> HierarchicalVAE:
    return small_model()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(6, *SIZE)).astype(np.float32)


def encoding(model, x: np.ndarray) -> list[torch.Tensor]:
    return model.encode(torch.tensor(x)[:, None]).z


# ---- arrays ------------------------------------------------------------------------------------


def test_second_stage_given_a_fitted_slice_draws_it_back_and_given_nothing_draws_freely(model):
    """The second stage is fitted to the codes of 40 slices, so its span holds each of them:
    keeping every group but the finest of one of those slices nearly pins the finest too, and
    the draws lie near that slice's reconstruction; keeping nothing, they lie as far as any."""
    images = np.random.default_rng(1).normal(size=(40, *SIZE)).astype(np.float32)
    prior = fit_second_stage(*model_codes(model, images))  # the density, not calibrated
    reconstruction = model.reconstruct(torch.tensor(images[3:4])[:, None])[0, 0].numpy()
    error = {}
    for kept in (range(model.config.levels), []):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            drawn = second_stage_given(model, prior, images[3], kept, 8, 1.0)
        error[len(kept)] = np.abs(drawn - reconstruction).mean()
    assert error[model.config.levels] < 0.25 * error[0]


def test_style_mix_decodes_pathology_of_a_with_anatomy_of_b(model, images):
    a, b, pathology = images[:3], images[3:], [2]
    za, zb = encoding(model, a), encoding(model, b)
    by_hand = model.decode([za[g] if g in pathology else zb[g] for g in range(5)], SIZE)
    reverse = model.decode([zb[g] if g in pathology else za[g] for g in range(5)], SIZE)
    ab, ba = style_mix(model, a, b, pathology)
    np.testing.assert_allclose(ab, by_hand.x_mean[:, 0].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ba, reverse.x_mean[:, 0].numpy(), rtol=0, atol=1e-6)
    assert np.abs(ab - model.decode(zb, SIZE).x_mean[:, 0].numpy()).max() > 1e-3


def test_layer_rows_keep_the_groups_above_exactly(model, images):
    draws = 3
    out = layer_rows(model, images[0], draws, temperature=1.0, seed=0)
    z = encoding(model, np.repeat(images[:1], draws, axis=0))
    assert out.images.shape == (5, draws, *SIZE) and np.array_equal(out.source, images[0])
    for level in range(5):
        for g in range(level):
            assert np.array_equal(out.z[level][g], z[g].numpy())
        redrawn = out.z[level][level]
        assert not np.allclose(redrawn, z[level].numpy(), atol=1e-3)
        assert not np.allclose(redrawn[0], redrawn[1], atol=1e-3)  # draws differ
        # residual mode coincides with value mode for a kept prefix (the docstring's claim)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            value = resample(model, torch.tensor(images[:1])[None], range(level), mode="value")
            torch.manual_seed(1)
            resid = resample(model, torch.tensor(images[:1])[None], range(level), mode="residual")
        torch.testing.assert_close(value.x_mean, resid.x_mean, rtol=1e-4, atol=1e-4)


def test_conditional_fixes_anatomy_and_moves_pathology(model, images):
    pathology, draws = [1, 3], 4
    out = conditional(model, images[0], images[1:4], pathology, draws, 1.0, seed=0)
    z = encoding(model, np.repeat(images[:1], draws, axis=0))
    for g in range(5):
        if g in pathology:
            assert not np.allclose(out.drawn_z[g][0], out.drawn_z[g][1], atol=1e-3)
        else:
            assert np.array_equal(out.drawn_z[g], z[g].numpy())
    zs, zo = encoding(model, np.repeat(images[:1], 3, axis=0)), encoding(model, images[1:4])
    by_hand = model.decode([zs[g] if g in pathology else zo[g] for g in range(5)], SIZE)
    np.testing.assert_allclose(out.moved, by_hand.x_mean[:, 0].numpy(), rtol=0, atol=1e-6)


def test_same_seed_same_arrays_other_seed_others(model, images):
    def arrays(seed: int) -> list[np.ndarray]:
        cond = conditional(model, images[0], images[1:3], [2], 2, 1.0, seed)
        with seeded(seed):
            prior = np.stack([prior_samples(model, 2, None, 2, t) for t in (0.5, 1.0)])
        return [prior,
                layer_rows(model, images[0], 2, 1.0, seed).images, cond.drawn, cond.moved]

    first, again, other = arrays(0), arrays(0), arrays(1)
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0]) and not np.array_equal(first[1], other[1])
    assert np.array_equal(first[3], other[3])  # the mix has no randomness


def test_cluster_assignment_is_the_brute_force_argmax(model, images):
    log_density = component_log_densities(model, images, batch_size=4)
    with torch.no_grad():
        component = model.pseudo_components()[0]
    mu = component.mu.double().numpy().reshape(4, -1)
    sigma = component.log_sigma.double().exp().numpy().reshape(4, -1)
    m = encoding(model, images)[0].double().numpy().reshape(len(images), -1)
    brute = norm.logpdf(m[:, None], mu[None], sigma[None]).sum(axis=2)  # (N, K)
    np.testing.assert_allclose(log_density, brute, rtol=1e-5)
    assert np.array_equal(responsibilities(log_density).argmax(1), brute.argmax(1))
    np.testing.assert_allclose(responsibilities(log_density).sum(1), 1.0)
    pseudo, decoded = pseudo_reconstructions(model)
    assert pseudo.shape == decoded.shape == (4, *SIZE)
    np.testing.assert_array_equal(pseudo, model.pseudo_inputs.detach()[:, 0].numpy())


def test_clusters_of_a_kind_without_vampprior_name_the_kind(images):
    with pytest.raises(PathanatError, match="'nvae' has no VampPrior"):
        pseudo_reconstructions(small_model("nvae"))
    with pytest.raises(PathanatError, match="'vae' has no VampPrior"):
        component_log_densities(small_model("vae"), images)


# ---- which slices ------------------------------------------------------------------------------


def planted_split() -> CacheSplit:
    """4 subjects x 3 slices; lesion pixels per (subject, slice) as in AREA."""
    area = np.array([[0, 9, 30], [40, 2, 0], [1, 0, 5], [25, 20, 3]])
    lesion = np.zeros((12, 8, 8), dtype=bool)
    for i, n in enumerate(area.ravel()):
        lesion[i].flat[:n] = True
    table = pd.DataFrame({"subject": np.repeat([f"s{k}" for k in range(4)], 3),
                          "slice": np.tile(range(3), 4)})
    image = np.zeros((12, 8, 8), np.float32)
    return CacheSplit("test", image, np.ones_like(lesion), lesion, None, table)


def test_pairs_have_lesions_in_a_and_fewest_in_another_subject_at_that_slice():
    data = planted_split()
    area = data.lesion.sum(axis=(1, 2))
    threshold = np.median(area[area > 0])  # 9 pixels
    pairs = choose_pairs(data, 5, seed=0)
    assert pairs == choose_pairs(data, 5, seed=0)
    strong = set(np.flatnonzero(area >= threshold))
    assert {a for a, _ in pairs} == strong  # all 5 slices with >= 9 lesion pixels
    subjects = data.slices["subject"].to_numpy()
    index = data.slices["slice"].to_numpy()
    # three subjects have a strong slice: the first three pairs take one each
    assert len({subjects[a] for a, _ in pairs[:3]}) == 3
    for a, b in pairs:
        assert subjects[b] != subjects[a] and index[b] == index[a]
        same = [i for i in range(12) if index[i] == index[a] and subjects[i] != subjects[a]]
        assert area[b] == min(area[same])


def test_more_pairs_than_slices_a_give_each_a_further_donors():
    data = planted_split()
    subjects = data.slices["subject"].to_numpy()
    first = choose_pairs(data, 5, seed=0)
    pairs = choose_pairs(data, 12, seed=0)
    assert pairs[:5] == first  # the first donors are the ones the figures use
    assert len(pairs) == 12 and len(set(pairs)) == 12
    for a in {a for a, _ in pairs}:
        donors = [subjects[b] for x, b in pairs if x == a]
        assert subjects[a] not in donors and len(set(donors)) == len(donors)
    # 5 slices a and 3 other subjects each: at most 15 pairs
    assert len(choose_pairs(data, 40, seed=0)) == 15


# ---- which groups ------------------------------------------------------------------------------


def write_analysis(path, z_p) -> None:
    path.write_text(json.dumps({"sensitivity": {"z_p_posthoc": z_p}}))


def test_pathology_groups_come_from_flag_then_supervision_then_analysis(tmp_path):
    analysis = tmp_path / "analysis.json"
    write_analysis(analysis, "z3")
    supervised = HVAEConfig(supervised=True, z_p=1)
    unsupervised = HVAEConfig(z_p=1)
    assert resolve_pathology_groups([4, 0, 4], supervised, analysis) == ([0, 4], "flag")
    assert resolve_pathology_groups(None, supervised, analysis) == ([1], "supervised z_P")
    assert resolve_pathology_groups(None, unsupervised, analysis) == (
        [3], "post-hoc z_P (analysis.json)")
    write_analysis(analysis, None)
    with pytest.raises(PathanatError, match=r"pathanat analyze .*--pathology-groups"):
        resolve_pathology_groups(None, unsupervised, analysis)
    analysis.unlink()
    with pytest.raises(PathanatError, match=r"pathanat analyze .*--pathology-groups"):
        resolve_pathology_groups(None, unsupervised, analysis)
    for bad in ([5], [-1], [], [True], [1.0], [0, 1, 2, 3, 4]):
        with pytest.raises(PathanatError, match=r"--pathology-groups: .*0\.\.4"):
            resolve_pathology_groups(bad, unsupervised, analysis)
    write_analysis(analysis, "zz")
    with pytest.raises(PathanatError, match="z_p_posthoc"):
        resolve_pathology_groups(None, unsupervised, analysis)


# ---- the run folder ----------------------------------------------------------------------------


def test_synthesize_run_writes_figures_captions_and_merged_json(tiny_run, tmp_path):
    run = tmp_path / "run"  # a copy: the fixture is shared by the session
    shutil.copytree(tiny_run, run)
    (run / "analysis.json").unlink(missing_ok=True)
    small = dict(temperatures=(1.0,), samples=2, draws=2, pairs=2, per_cluster=2, progress=False)
    with pytest.raises(PathanatError, match="pathanat analyze"):
        synthesize_run(run, **small)
    assert not (run / "synthesis.json").exists()
    with pytest.raises(PathanatError, match="--what"):
        synthesize_run(run, what=["prior", "mixing"], **small)

    write_analysis(run / "analysis.json", "z1")
    summary = synthesize_run(run, **small)
    written = json.loads((run / "synthesis.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["model"] == "nvmp" and written["seed"] == 0
    assert written["pathology_groups"] == [1]
    assert written["pathology_source"] == "post-hoc z_P (analysis.json)"
    assert list(written["figures"]) == list(ALL)
    for what, path in written["figures"].items():
        assert (run / path).read_bytes()[:4] == b"\x89PNG"
        caption = (run / path).with_suffix(".txt").read_text()
        assert caption.count("\n") == 1 and caption.startswith("nvmp: ")
        if what in ("style-mix", "conditional"):
            assert "z1" in caption and "mode value" in caption
    assert written["figures"]["style-mix"] == "figures/synth_style_mix.png"

    prior = (run / "figures" / "synth_prior.png").read_bytes()
    assert "Last row: the second-stage prior" in (run / "figures" / "synth_prior.txt").read_text()
    assert "Lower rows: the same" in (run / "figures" / "synth_layers.txt").read_text()
    assert "Last row: the pathology" in (run / "figures" / "synth_conditional.txt").read_text()
    again = synthesize_run(run, what=["style-mix", "prior"], pathology_groups=[2], **small)
    merged = json.loads((run / "synthesis.json").read_text())
    assert merged == json.loads(json.dumps(again))
    assert list(merged["figures"]) == list(ALL)  # the earlier figures are kept
    assert merged["pathology_groups"] == [2] and merged["pathology_source"] == "flag"
    assert merged["settings"]["style-mix"]["pathology_groups"] == [2]
    assert merged["settings"]["conditional"]["pathology_groups"] == [1]
    assert "z2" in (run / "figures" / "synth_style_mix.txt").read_text()
    assert (run / "figures" / "synth_prior.png").read_bytes() == prior  # same seed, same figure

    (run / "analysis.json").unlink()  # figures without pathology groups need none
    synthesize_run(run, what=["clusters", "layers"], **small)
    assert json.loads((run / "synthesis.json").read_text())["pathology_groups"] == [2]
