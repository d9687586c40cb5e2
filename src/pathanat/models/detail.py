"""The finest group's detail that the second stage cannot draw, drawn by a small conditional
diffusion model (opt-in: ``second_stage.detail_steps`` of the experiment config).

Why: a second-stage draw lies in the span of the training codes' first principal directions
(``models.second_stage``), which keeps under half of a new slice's finest group z_L; the rest is
each slice's own detail. Measured on the cpu grid's nvae_ms_sup (docs/generation.md, fourteenth
to sixteenth rounds; FID against the validation inputs): validation codes projected onto the span
decode to FID 56.9 where their reconstructions score 27.9, so even a perfect density in the span
is 2x off. What lies off the span is drawable given what the second stage draws -- the decoder
state its coarse groups lead to and z_L's part in the span: a diffusion model of it took the
calibrated draws from 64.4 to 57.8. A conditional mean of it (blurred) and the model's own
per-element prior (speckle) do not.

The model: noise prediction on the cosine schedule; a denoiser of dilated residual blocks that
reads the noised off-span residual beside [decoder state, in-span residual]. It is fitted on
random crops of the training slices' off-span residuals (scaled to unit spread), their
conditions decoded from the codes projected onto the span, as a draw's are; Adam with a
one-cycle lr. Its fit must run long enough: fits of 2500 steps, and of 4000 with a running
average of the weights, made the draws worse than none, 8000 steps better, and 16000 better
again (FID 7-12% lower than 8000's on seed 0 of the cpu grid), all with nearly the same final
loss (docs/generation.md, fifteenth, seventeenth and eighteenth rounds), so only the FID of draws
tells. Draws: deterministic DDIM steps from noise, the predicted clean value clipped to +-4
spreads at every step (unclipped, a short fit's draws blew up: fourteenth round); 25 steps
scored as 50 did, 10 worse.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pathanat.errors import InputError, checked_int
from pathanat.hardware import cpu_autocast
from pathanat.models.hvae import HierarchicalVAE
from pathanat.models.outputs import Generated
from pathanat.models.second_stage import SecondStagePrior, at_most, model_codes, split_groups

WIDTH = 32
DILATIONS = (1, 2, 4, 8, 1, 2, 4, 1)  # with the 3x3 convs, a receptive field of 67 pixels
CROP = (48, 56)  # training crops (a quarter of a 96 x 112 slice), at most the slice
BATCH = 32
PEAK_LR = 2e-3
DRAW_STEPS = 25
CLIP = 4.0  # spreads; the off-span residuals are scaled to unit spread
# what a stored detail model was fitted and is drawn with (a cache key beside its steps)
DETAIL_RECIPE = [WIDTH, list(DILATIONS), list(CROP), BATCH, PEAK_LR, DRAW_STEPS, CLIP]


def noise_level(t: Tensor) -> Tensor:
    """alpha_bar(t) of the cosine schedule, t in [0, 1): the share of the clean signal's power."""
    return torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


class Block(nn.Module):
    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.spread = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)
        self.mix = nn.Conv2d(width, width, 3, padding=1)
        self.time = nn.Linear(width, width)

    def forward(self, y: Tensor, time: Tensor) -> Tensor:
        inner = self.spread(F.gelu(y)) + self.time(time)[:, :, None, None]
        return y + self.mix(F.gelu(inner))


class Denoiser(nn.Module):
    """The noise in x_t (N, channels, h, w) given the condition (N, condition_channels, h, w)
    and the time t (N,)."""

    def __init__(self, condition_channels: int, channels: int, width: int = WIDTH) -> None:
        super().__init__()
        self.inp = nn.Conv2d(condition_channels + channels, width, 3, padding=1)
        self.frequencies = nn.Parameter(  # fixed sinusoid frequencies of the time embedding
            torch.exp(-math.log(1e4) * torch.arange(32) / 32), requires_grad=False)
        self.time = nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(Block(width, d) for d in DILATIONS)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # starts predicting no noise
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, condition: Tensor, t: Tensor) -> Tensor:
        angle = 1000 * t[:, None] * self.frequencies
        time = F.gelu(self.time(torch.cat([angle.sin(), angle.cos()], 1)))
        y = self.inp(torch.cat([x, condition], 1))
        for block in self.blocks:
            y = block(y, time)
        return self.out(F.gelu(y))


@torch.no_grad()
def ddim(predict_noise: Callable[[Tensor, Tensor], Tensor], shape: tuple[int, ...],
         steps: int = DRAW_STEPS, generator: torch.Generator | None = None) -> Tensor:
    """Draws of ``shape`` by deterministic DDIM from noise in ``steps`` steps;
    ``predict_noise(x_t, t)`` (t one value per draw). The predicted clean value is clipped to
    +-``CLIP`` at every step, and the last step's is the draw."""
    checked_int(steps, "steps", error=InputError)
    x = torch.randn(shape, generator=generator)
    times = torch.linspace(0.999, 0.0, steps + 1)
    for now, then in itertools.pairwise(times):
        a_now, a_then = noise_level(now), noise_level(then)
        noise = predict_noise(x, now.expand(shape[0])).float()
        clean = ((x - (1 - a_now).sqrt() * noise) / a_now.sqrt()).clamp(-CLIP, CLIP)
        noise = (x - a_now.sqrt() * clean) / (1 - a_now).sqrt()
        x = a_then.sqrt() * clean + (1 - a_then).sqrt() * noise
    return clean


def fit_denoiser(targets: Tensor, conditions: Tensor, steps: int, seed: int = 0,
                 progress: bool = False) -> Denoiser:
    """A ``Denoiser`` of ``targets`` (N, C, H, W; unit spread) given ``conditions``
    (N, C', H, W), fitted for ``steps`` steps on random crops."""
    checked_int(steps, "steps", error=InputError)
    if targets.shape[0] != conditions.shape[0] or targets.shape[2:] != conditions.shape[2:]:
        raise InputError(f"targets {tuple(targets.shape)} and conditions "
                         f"{tuple(conditions.shape)}: expected the same N, H and W")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = Denoiser(conditions.shape[1], targets.shape[1])
    net = net.to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(net.parameters(), PEAK_LR / 2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, PEAK_LR, total_steps=steps,
                                                   pct_start=0.05)
    height, width = (min(c, s) for c, s in zip(CROP, targets.shape[2:], strict=True))
    for _ in tqdm(range(steps), desc="detail model", disable=not progress, leave=False):
        pick = torch.randint(len(targets), (BATCH,), generator=generator)
        i = int(torch.randint(targets.shape[2] - height + 1, (1,), generator=generator))
        j = int(torch.randint(targets.shape[3] - width + 1, (1,), generator=generator))
        crop = (pick, slice(None), slice(i, i + height), slice(j, j + width))
        clean, condition = targets[crop].float(), conditions[crop].float()
        t = torch.rand(BATCH, generator=generator) * 0.999
        level = noise_level(t)[:, None, None, None]
        noise = torch.randn(clean.shape, generator=generator)
        noised = level.sqrt() * clean + (1 - level).sqrt() * noise
        with cpu_autocast():
            predicted = net(noised.contiguous(memory_format=torch.channels_last),
                            condition.contiguous(memory_format=torch.channels_last), t)
        loss = (predicted.float() - noise).pow(2).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return net.eval()


@torch.no_grad()
def last_states(model: HierarchicalVAE, residuals: list[Tensor], size: tuple[int, int],
                batch_size: int = 64) -> Tensor:
    """The decoder state (N, width, h, w) at the last group when ``residuals`` are decoded
    top-down: what the detail model is conditioned on."""
    last, states = model.config.num_groups - 1, []
    for start in range(0, len(residuals[0]), batch_size):
        part = [r[start:start + batch_size] for r in residuals]
        seen = {}

        def choose(level: int, prior, state: Tensor, part=part, seen=seen) -> Tensor:
            if level == last:
                seen["state"] = state.float()
            return prior.unstandardise(part[level]) if prior is not None else part[level]

        model.generate(len(part[0]), size, choose)
        states.append(seen["state"])
    return torch.cat(states)


def fit_detail(model: HierarchicalVAE, prior: SecondStagePrior, images: np.ndarray, steps: int,
               seed: int = 0, batch_size: int = 64, progress: bool = False) -> SecondStagePrior:
    """``prior`` (fitted to ``model``'s codes of the training slices ``images``, (N, H, W)) with
    a detail model of the last group's off-span residual fitted for ``steps`` steps on the same
    slices (at most ``FIT_SLICES`` of them)."""
    codes, _ = model_codes(model, at_most(images, seed), batch_size)
    last = len(prior.shapes) - 1
    own = split_groups(codes, prior.shapes)[last]
    projected = prior.project(codes)
    off_span = own - projected[last]
    scale = float(off_span.std())
    if not scale > 1e-6 * float(own.std()):
        raise InputError(f"a detail model: the second stage's span ({prior.directions.shape[0]} "
                         f"directions) holds all {len(codes)} training codes, so nothing lies "
                         "off it to model; it needs more training slices than directions")
    states = last_states(model, projected, tuple(images.shape[1:]), batch_size)
    net = fit_denoiser(off_span / scale, torch.cat([states, projected[last]], 1), steps, seed,
                       progress)
    state = {"weights": dict(net.state_dict()), "scale": scale,
             "condition_channels": int(states.shape[1]) + prior.shapes[last][0], "steps": steps}
    return replace(prior, detail=state)


def detail_net(prior: SecondStagePrior) -> Denoiser:
    """``prior``'s detail model, built from its stored weights."""
    state = prior.detail
    channels = prior.shapes[-1][0]
    net = Denoiser(state["condition_channels"], channels)
    net.load_state_dict(state["weights"])
    return net.eval()


@torch.no_grad()
def decode_draws(model: HierarchicalVAE, prior: SecondStagePrior, residuals: list[Tensor],
                 size: tuple[int, int], with_detail: bool = True,
                 generator: torch.Generator | None = None) -> Generated:
    """Images from second-stage residual codes (``prior.draw``'s form), top-down. Where ``prior``
    has a detail model and ``with_detail``, the last group's off-span part is drawn by it given
    the decoder state and the group's residual (pass False where that group is a slice's own)."""
    if prior.detail is None or not with_detail:
        return model.from_residuals(residuals, size)
    net, scale = detail_net(prior), prior.detail["scale"]

    def detailed(state: Tensor, in_span: Tensor) -> Tensor:
        condition = torch.cat([state.float(), in_span], 1).contiguous(
            memory_format=torch.channels_last)

        def predict_noise(x: Tensor, t: Tensor) -> Tensor:
            with cpu_autocast():
                return net(x.contiguous(memory_format=torch.channels_last), condition, t)

        return in_span + scale * ddim(predict_noise, tuple(in_span.shape), generator=generator)

    return model.from_residuals(residuals, size, last=detailed)

