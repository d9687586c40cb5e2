"""The brain-shape test of generated slices, against slices whose answer is known."""

import numpy as np
import pytest
from scipy import ndimage

from pathanat.data.prepare import load_cache
from pathanat.evaluation.plausibility import (
    BRAIN_LIKE_DICE,
    best_dice,
    brain_like,
    brain_references,
    foreground,
    plausibility,
    shape_diversity,
    wilson_interval,
)


@pytest.fixture(scope="module")
def cache(tiny_run):
    return load_cache(tiny_run.parent / "cache")


@pytest.fixture(scope="module")
def references(cache):
    return brain_references(cache)


def test_real_slices_are_brain_like_noise_is_not(cache, references):
    test = cache.split("test")
    real = plausibility(np.asarray(test.image), references, test.slices["subject"].to_numpy())
    assert real["brain_like"]["mean"] >= 0.9
    assert "subject bootstrap" in real["brain_like"]["ci_method"]
    noise = np.random.default_rng(0).standard_normal((32, *cache.shape))
    drawn = plausibility(noise, references)
    assert drawn["brain_like"]["mean"] == 0.0
    assert drawn["brain_like"]["ci_high"] < 0.15  # Wilson's interval for 0 of 32
    assert drawn["n"] == 32


def test_a_shifted_blurred_mean_brain_is_not_brain_like(cache, references):
    train = cache.split("train")
    mean = ndimage.gaussian_filter(np.asarray(train.image).mean(0), 1.0)
    ok, dice, _ = brain_like(mean[None], references)
    assert ok.all()  # where real brains sit, the mean brain's outline is a brain's outline
    rng = np.random.default_rng(1)
    # 4 px at 4 mm: the outline 16 mm away from where any prepared slice puts the brain
    shifts = [(rng.choice([-4, 4]), rng.choice([-4, 4])) for _ in range(16)]
    shifted = np.stack([ndimage.shift(mean, s, order=1, mode="nearest") for s in shifts])
    ok, dice, _ = brain_like(shifted, references)
    assert not ok.any()
    assert np.median(dice) < 0.9


def _inside_a_real_outline(cache, fill) -> np.ndarray:
    """Test slices whose brain is replaced by ``fill(brain values, rng)``: a real outline."""
    test = cache.split("test")
    images, masks = np.array(test.image[:16]), np.asarray(test.brain[:16]).astype(bool)
    rng = np.random.default_rng(2)
    for image, mask in zip(images, masks, strict=True):
        image[mask] = fill(image[mask], rng)
    return images


def test_a_real_outline_without_a_brain_inside_is_not_brain_like(cache, references):
    """The outline alone is not a brain: a real slice's outline filled with its mean intensity
    and blurred (what decoded prior means looked like), or with a mottled texture of the brain's
    mean and spread (what prior draws looked like), passes the outline test and fails."""
    def flat(values, rng):
        return np.full_like(values, values.mean())

    blurred = np.stack([ndimage.gaussian_filter(im, 2.0) for im in _inside_a_real_outline(
        cache, flat)])

    def mottled(values, rng):
        return values.mean() + values.std() * rng.standard_normal(values.shape)

    textured = np.stack([ndimage.gaussian_filter(im, 1.0) for im in _inside_a_real_outline(
        cache, mottled)])
    for images in (blurred, textured):
        ok, dice, structure = brain_like(images, references)
        assert (dice >= BRAIN_LIKE_DICE).all()  # the old, outline-only test passed them
        assert not ok.any()
        assert structure.max() < references.structure_threshold
    # the same slices untouched but blurred as much pass: blur alone does not fail a brain
    real = np.stack([ndimage.gaussian_filter(im, 1.0) for im in np.asarray(
        cache.split("test").image[:16])])
    assert brain_like(real, references)[0].all()


def test_foreground_is_the_largest_filled_component():
    image = np.zeros((40, 40))
    image[5:25, 5:25] = 1.0  # a ring with a hole ...
    image[10:20, 10:20] = 0.0
    image[30:34, 30:34] = 1.0  # ... and a small separate blob
    mask = foreground(image)
    assert mask[5:25, 5:25].all()  # the hole is filled
    assert mask.sum() == 400  # the blob is dropped
    assert not foreground(np.full((8, 8), 3.0)).any()  # a constant slice has no object


def test_best_dice_matches_a_loop():
    rng = np.random.default_rng(2)
    a = rng.random((7, 6, 5)) > 0.5
    b = rng.random((9, 6, 5)) > 0.4
    loop = [max(2 * (m & r).sum() / (m.sum() + r.sum()) for r in b) for m in a]
    np.testing.assert_allclose(best_dice(a, b, chunk=3), loop)


def test_shape_diversity_matches_a_loop_and_is_zero_for_one_shape_repeated():
    rng = np.random.default_rng(3)
    masks = rng.random((6, 8, 9)) > 0.5
    loop = [1 - 2 * (a & b).sum() / (a.sum() + b.sum())
            for i, a in enumerate(masks) for b in masks[i + 1:]]
    assert shape_diversity(masks) == pytest.approx(np.mean(loop))
    assert shape_diversity(np.repeat(masks[:1], 5, axis=0)) == 0.0
    left, right = np.zeros((2, 4, 4), dtype=bool)
    left[:, :2], right[:, 2:] = True, True
    assert shape_diversity(np.stack([left, right])) == 1.0  # disjoint shapes


def test_one_brain_drawn_again_passes_the_shape_test_but_not_the_diversity(cache, references):
    test = cache.split("test")
    real = plausibility(np.asarray(test.image), references, test.slices["subject"].to_numpy())
    image = np.asarray(test.image)[0]
    noisy = image + 0.05 * np.random.default_rng(4).standard_normal((32, *image.shape))
    copies = plausibility(noisy, references)
    assert copies["brain_like"]["mean"] == 1.0
    assert copies["shape_diversity"] < 0.2 * real["shape_diversity"]


def test_wilson_interval_textbook_values():
    # Wilson (1927) score intervals at 95%, as tabulated e.g. by Newcombe (1998)
    np.testing.assert_allclose(wilson_interval(0, 10), (0.0, 0.2775), atol=1e-4)
    np.testing.assert_allclose(wilson_interval(5, 10), (0.2366, 0.7634), atol=1e-4)
    np.testing.assert_allclose(wilson_interval(81, 263), (0.2553, 0.3662), atol=1e-4)


@pytest.mark.slow
def test_samples_become_brain_like_as_a_tiny_model_trains(tiny_run, tmp_path):
    """The metric follows training: a fresh model's prior samples are not brains, the same
    model trained with the generation recipe (docs/generation.md) for 300 steps draws brains."""
    import torch

    from pathanat.experiment import DataConfig, ExperimentConfig, TrainerConfig
    from pathanat.models import HierarchicalVAE, HVAEConfig
    from pathanat.runs import load_trained
    from pathanat.training.run import train_config

    cache = tiny_run.parent / "cache"
    shape = load_cache(cache).shape
    config = ExperimentConfig(
        data=DataConfig(cache=cache, shape=shape, batch_size=16),
        model=HVAEConfig(kind="nvmp", image_size=shape, levels=3, widths=(32, 32, 16, 8),
                         cells=(2, 1, 1, 1), pseudo_inputs=4, conditional_prior="recentred"),
        trainer=TrainerConfig(max_steps=300, accelerator="cpu", log_every=50, val_every=300,
                              checkpoint_every=300, progress_bar=False),
    )
    config.optim.lr, config.optim.warmup_steps, config.optim.grad_clip = 1e-3, 20, 100.0
    config.objective.kl_cycle = 600  # one rise over the run
    references = brain_references(load_cache(cache))

    def fraction(model: HierarchicalVAE) -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            samples = model.eval().sample(64, 0.8).x_mean[:, 0].numpy()
        return float(brain_like(samples, references)[0].mean())

    torch.manual_seed(0)
    before = fraction(HierarchicalVAE(config.model))
    trained, _ = load_trained(train_config(config, tmp_path / "run"))
    after = fraction(trained)
    assert before <= 0.1
    assert after >= 0.8
