"""Tissue and lesion segmenters of a cohort: the instruments that measure sample validity.

One compact U-Net (``SegNet``) is trained twice on the ground truth of a cache's train split: a
lesion segmenter (one logit, BCE + soft Dice) and a tissue segmenter (the six dseg classes,
cross-entropy weighted by 1 / sqrt(label frequency)). Both learn on the same augmented batches
and are scored on the test split (Dice per tissue label; lesion Dice, precision and recall at
probability 0.5, pooled over voxels).
The tissue segmenter names the anatomy *beneath* lesions: its input is the slice with the lesion
voxels (grown by one pixel) blanked, plus that mask (the true mask in training, the lesion
segmenter's at use), so it infers a lesion's tissue from the surroundings. Shown the bright blob
itself it learns the shortcut "bright blob = WM" (every training lesion is in WM) and calls a
blob painted into a ventricle white matter.

They must judge *prior samples*, which are blurry and may put lesions anywhere, while every
training lesion sits in white matter. Hence the augmentation, applied to each training slice:

- planted blobs: 0-3 soft ellipses (semi-axes 1.5-5 mm, elongation up to 1.8, 1 mm soft edge,
  intensity drawn from the real lesions' standardised range) at random places (in CSF or the
  ventricles with probability 0.4, in the brain mask 0.4, anywhere 0.2: invalid places are where
  the segmenters must not be fooled). They are *lesions* for the lesion segmenter and
  leave the *tissue* label unchanged, so the lesion segmenter detects a bright blob wherever it is
  (it does not learn that lesions live in WM) and the tissue segmenter learns to fill in the
  anatomy under a mask in CSF, ventricles and background too;
- left-right flip (p 0.5); Gaussian blur (p 0.5, sigma 0-1.5 px), as samples are smooth;
- intensity scale (x 0.8-1.25) and shift (+-0.3), then Gaussian noise (sigma 0-0.15).

The segmenters belong to the cohort, not to a run: they are saved once per cache as
``CACHE/segmenters/segmenters.pt`` (tensors and plain types; ``torch.load(weights_only=True)``)
and ``accuracy.json``, keyed to the SHA-256 of the cache's ``manifest.json``. ``cohort_segmenters``
reuses them while the manifest is unchanged and retrains when it changes. Training is seeded and
deterministic on CPU for a given number of threads; it runs under bf16 autocast with fp32 losses
where the CPU has bf16 arithmetic, in fp32 elsewhere (``hardware.cpu_autocast``).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from pathanat.atomic import atomic_dir
from pathanat.data.prepare import Cache, CacheSplit
from pathanat.errors import InputError, OutputBusyError, checked_int
from pathanat.hardware import cpu_autocast
from pathanat.jsonfiles import finite_or_none, write_json

TISSUE_LABELS = ("background", "CSF", "ventricles", "GM", "WM", "hippocampus")  # dseg 0..5
LESION_THRESHOLD = 0.5  # a voxel is lesion-like when the lesion probability exceeds this
FORMAT = 1
FOLDER = "segmenters"
WEIGHTS = "segmenters.pt"
ACCURACY = "accuracy.json"

# Training (benchmarks/bench_validity.py: ~1-2 min on 2 CPU cores at 96 x 112, any cohort size,
# as the step count is fixed).
WIDTHS = (8, 16, 32, 32)  # channels per scale; 3 poolings: receptive field ~70 px
STEPS = 600
BATCH_SIZE = 16
LR = 1e-2

# Augmentation (see the module docstring).
BLOBS_PER_SLICE = 3
BLOB_PROB = 0.5  # each of the BLOBS_PER_SLICE candidate blobs is planted with this probability
BLOB_POOLS = (0.4, 0.4, 0.2)  # centre in CSF/ventricles, in the brain mask, anywhere
BLOB_SEMI_MM = (1.5, 5.0)
BLOB_ELONGATION = (1.0, 1.8)
BLOB_EDGE_MM = 1.0
BLOB_INTENSITY = (0.8, 2.8)  # standardised, the 5th-95th percentile of the phantom's lesions
BLUR_PROB = 0.5
BLUR_SIGMA = (0.0, 1.5)
SCALE = (0.8, 1.25)
SHIFT = 0.3
NOISE = 0.15


def conv_block(cin: int, cout: int) -> nn.Sequential:
    layers = []
    for a, b in ((cin, cout), (cout, cout)):
        layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
    return nn.Sequential(*layers)


class SegNet(nn.Module):
    """A compact U-Net: (N, in_channels, H, W) -> (N, classes, H, W) logits."""

    def __init__(self, classes: int, in_channels: int = 1, widths: tuple[int, ...] = WIDTHS):
        super().__init__()
        self.classes = classes
        self.in_channels = in_channels
        self.widths = tuple(widths)
        self.down = nn.ModuleList(
            conv_block(cin, cout)
            for cin, cout in zip((in_channels, *widths[:-1]), widths, strict=True)
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in reversed(range(len(widths) - 1))
        )
        self.merge = nn.ModuleList(
            conv_block(2 * widths[i], widths[i]) for i in reversed(range(len(widths) - 1))
        )
        self.head = nn.Conv2d(widths[0], classes, 1)
        if classes == 1:
            # Start at p = 1% (lesions are rare), not 50%: the first hundred steps would
            # otherwise be spent learning the background (as in RetinaNet's prior init).
            nn.init.constant_(self.head.bias, -math.log(99.0))

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        m = self.multiple
        # Any slice size: pad to a multiple of 2^poolings by repeating the border, crop after.
        x = F.pad(x, (0, -w % m, 0, -h % m), mode="replicate")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge, strict=True):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)[..., :h, :w]


@dataclass
class Segmenters:
    """A trained pair and what it was trained on and scored as."""

    tissue: SegNet
    lesion: SegNet
    manifest_sha256: str
    settings: dict
    accuracy: dict
    path: Path | None = None  # the segmenters.pt it was loaded from or saved to


def manifest_sha256(cache: Cache) -> str:
    return hashlib.sha256((Path(cache.path) / "manifest.json").read_bytes()).hexdigest()


def check_cache(cache: Cache) -> None:
    missing = [name for name in ("lesion", "dseg") if name not in cache.manifest["arrays"]]
    if missing:
        raise InputError(
            f"{cache.path}: the segmenters need ground-truth lesion masks and dseg tissue labels; "
            f"this cache has no {' and no '.join(missing)} (an MS phantom cache has both)"
        )


# ---- augmentation ---------------------------------------------------------------------------


def uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def blob_centres(brain: Tensor, fluid: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """(N, k, 2) pixel centres, each drawn from one of three pools: CSF or ventricles, the brain
    mask, anywhere (BLOB_POOLS). A slice whose pool is empty draws from the next one."""
    n, w = brain.shape[0], brain.shape[-1]
    anywhere = torch.ones(n, brain[0].numel())
    pools = [fluid.reshape(n, -1).float(), brain.reshape(n, -1).float(), anywhere]
    for i in (1, 0):  # fall back to the wider pool where this one is empty
        empty = pools[i].sum(1, keepdim=True) == 0
        pools[i] = torch.where(empty, pools[i + 1], pools[i])
    drawn = torch.stack([torch.multinomial(p, k, replacement=True, generator=gen) for p in pools])
    pool = torch.multinomial(torch.tensor(BLOB_POOLS), n * k, replacement=True, generator=gen)
    idx = drawn.reshape(3, -1).gather(0, pool[None]).reshape(n, k)
    jitter = torch.rand((n, k, 2), generator=gen) - 0.5
    return torch.stack([idx // w, idx % w], -1).float() + jitter


def planted_blobs(
    x: Tensor, brain: Tensor, fluid: Tensor, pixel_mm: float, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Slices (N, H, W) with lesion-like blobs blended in, and the blobs' mask (occupancy > 0.5)."""
    n, h, w = x.shape
    k = BLOBS_PER_SLICE
    centres = blob_centres(brain, fluid, k, gen)
    semi = uniform(gen, (n, k, 1), *BLOB_SEMI_MM) / pixel_mm
    semi = semi * torch.cat([torch.ones(n, k, 1), uniform(gen, (n, k, 1), *BLOB_ELONGATION)], -1)
    angle = uniform(gen, (n, k), 0.0, math.pi)
    cos, sin = torch.cos(angle), torch.sin(angle)
    value = uniform(gen, (n, k), *BLOB_INTENSITY)
    present = torch.rand((n, k), generator=gen) < BLOB_PROB
    grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).float()
    out, mask = x.clone(), torch.zeros_like(x, dtype=torch.bool)
    for j in range(k):
        d = grid[None] - centres[:, j, None, None]  # (N, H, W, 2)
        u = d[..., 0] * cos[:, j, None, None] + d[..., 1] * sin[:, j, None, None]
        v = -d[..., 0] * sin[:, j, None, None] + d[..., 1] * cos[:, j, None, None]
        a, b = semi[:, j, 0, None, None], semi[:, j, 1, None, None]
        radius = torch.sqrt((u / a) ** 2 + (v / b) ** 2)
        # 0.5 on the ellipse, ramping to 0 and 1 over BLOB_EDGE_MM along the short axis, as the
        # phantom draws its lesions' partial-volume edge.
        soft = ((0.5 + (1.0 - radius) * a * pixel_mm / BLOB_EDGE_MM).clamp(0, 1)
                * present[:, j, None, None])
        out = out * (1 - soft) + soft * value[:, j, None, None]
        mask |= soft > 0.5
    return out, mask


def blurred(x: Tensor, gen: torch.Generator) -> Tensor:
    """(N, 1, H, W) each slice blurred with probability BLUR_PROB by its own Gaussian sigma."""
    n = x.shape[0]
    sigma = uniform(gen, (n,), *BLUR_SIGMA) * (torch.rand(n, generator=gen) < BLUR_PROB)
    radius = math.ceil(3 * BLUR_SIGMA[1])
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True))[:, None, None]  # (N, 1, 1, K)
    # One grouped convolution per axis: every slice with its own kernel.
    y = F.pad(x.transpose(0, 1), (radius, radius, 0, 0), mode="replicate")
    y = F.conv2d(y, kernel, groups=n)
    y = F.pad(y, (0, 0, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel.transpose(-1, -2), groups=n)
    return y.transpose(0, 1)


def augmented(
    image: Tensor, brain: Tensor, lesion: Tensor, dseg: Tensor, pixel_mm: float,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """A training batch: input (N, 1, H, W), lesion target (N, H, W) float, dseg (N, H, W) long."""
    n = image.shape[0]
    fluid = (dseg == TISSUE_LABELS.index("CSF")) | (dseg == TISSUE_LABELS.index("ventricles"))
    x, blobs = planted_blobs(image, brain, fluid, pixel_mm, gen)
    lesion = lesion.bool() | blobs
    flip = torch.rand(n, generator=gen) < 0.5
    x, lesion, dseg = (torch.where(flip[:, None, None], t.flip(-1), t) for t in (x, lesion, dseg))
    x = blurred(x[:, None], gen)
    x = x * uniform(gen, (n, 1, 1, 1), *SCALE) + uniform(gen, (n, 1, 1, 1), -SHIFT, SHIFT)
    x = x + uniform(gen, (n, 1, 1, 1), 0.0, NOISE) * torch.randn(x.shape, generator=gen)
    return x, lesion.float(), dseg.long()


# ---- training and scoring -------------------------------------------------------------------


def tissue_input(x: Tensor, lesion: Tensor) -> Tensor:
    """The tissue segmenter's input (N, 2, H, W): the slice with its lesions, grown by one pixel
    to cover their partial-volume rim, blanked to 0, and that mask. The tissue beneath a lesion
    must then be inferred from its surroundings: a bright blob cannot pass for white matter."""
    mask = F.max_pool2d(lesion.float()[:, None], 3, stride=1, padding=1)
    return torch.cat([x * (1 - mask), mask], 1).contiguous(memory_format=torch.channels_last)


def class_weights(dseg: Tensor) -> Tensor:
    """Cross-entropy weights proportional to 1 / sqrt(label frequency), averaging 1 over voxels:
    unweighted, the hippocampus (0.14% of voxels) is never predicted (test Dice 0)."""
    freq = torch.bincount(dseg.reshape(-1).long(), minlength=len(TISSUE_LABELS)).double()
    freq = (freq / freq.sum()).clamp_min(1e-6)
    weights = freq**-0.5
    return (weights / (freq * weights).sum()).float()


def soft_dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    p = torch.sigmoid(logits)
    return 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)


def as_batch(images: np.ndarray) -> Tensor:
    x = torch.tensor(np.asarray(images, dtype=np.float32))[:, None]
    return x.contiguous(memory_format=torch.channels_last)


def train_segmenters(
    cache: Cache,
    steps: int = STEPS,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    progress: bool = False,
) -> Segmenters:
    """Train the tissue and lesion segmenters on ``cache``'s train split and score them on its
    test split. Nothing is written; ``cohort_segmenters`` saves them."""
    checked_int(steps, "steps"), checked_int(batch_size, "batch_size")
    check_cache(cache)
    train = cache.split("train")
    pixel_mm = float(cache.manifest["parameters"]["in_plane_mm"])
    arrays = {name: torch.tensor(np.asarray(getattr(train, name))) for name in
              ("image", "brain", "lesion", "dseg")}
    arrays["image"] = arrays["image"].float()
    start = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tissue = SegNet(len(TISSUE_LABELS), in_channels=2).to(memory_format=torch.channels_last)
        lesion = SegNet(1).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed)
    weights = class_weights(arrays["dseg"])
    params = [*tissue.parameters(), *lesion.parameters()]
    optimizer = torch.optim.Adam(params, lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # cosine to 0: converges within a fixed budget
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    tissue.train(), lesion.train()
    for _ in tqdm(range(steps), desc="segmenters", disable=not progress):
        idx = torch.randint(len(train), (batch_size,), generator=gen)
        x, lesion_target, dseg = augmented(
            *(arrays[name][idx] for name in ("image", "brain", "lesion", "dseg")), pixel_mm, gen
        )
        x = x.contiguous(memory_format=torch.channels_last)
        with cpu_autocast():
            # The true lesion mask (blobs included) hides the lesions from the tissue
            # segmenter; at use, the lesion segmenter's mask does.
            tissue_logits = tissue(tissue_input(x, lesion_target))
            lesion_logits = lesion(x)[:, 0]
        tissue_logits, lesion_logits = tissue_logits.float(), lesion_logits.float()
        loss = (F.cross_entropy(tissue_logits, dseg, weight=weights)
                + F.binary_cross_entropy_with_logits(lesion_logits, lesion_target)
                + soft_dice_loss(lesion_logits, lesion_target))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    settings = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": LR,
                "widths": list(WIDTHS), "train_slices": len(train),
                "train_seconds": round(seconds, 2), "torch_threads": torch.get_num_threads()}
    segs = Segmenters(tissue.eval(), lesion.eval(), manifest_sha256(cache), settings, {})
    segs.accuracy = segmenter_accuracy(segs, cache.split("test"))
    return segs


@torch.no_grad()
def segment(
    segs: Segmenters, images: np.ndarray, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue labels (N, H, W) uint8 (argmax) and lesion probabilities (N, H, W) float32."""
    segs.tissue.eval(), segs.lesion.eval()
    labels, probs = [], []
    for i in range(0, len(images), batch_size):
        x = as_batch(images[i : i + batch_size])
        with cpu_autocast():
            prob = torch.sigmoid(segs.lesion(x).float()[:, 0])
            tissue_logits = segs.tissue(tissue_input(x, prob > LESION_THRESHOLD))
        labels.append(tissue_logits.float().argmax(1).to(torch.uint8).numpy())
        probs.append(prob.numpy())
    return np.concatenate(labels), np.concatenate(probs)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean arrays; NaN when both are empty (nothing to find, nothing found)."""
    total = pred.sum() + truth.sum()
    return float(2 * (pred & truth).sum() / total) if total else math.nan


def segmenter_accuracy(segs: Segmenters, data: CacheSplit) -> dict:
    """Voxel-pooled accuracy on a split: Dice per tissue label, lesion Dice/precision/recall."""
    labels, probs = segment(segs, data.image)
    dseg, truth = np.asarray(data.dseg), np.asarray(data.lesion).astype(bool)
    found = probs > LESION_THRESHOLD
    hits = (found & truth).sum()
    majority = np.bincount(dseg.ravel(), minlength=len(TISSUE_LABELS)).max() / dseg.size
    return {
        "split": data.name,
        "slices": len(data),
        "tissue_dice": {name: dice(labels == k, dseg == k) for k, name in enumerate(TISSUE_LABELS)},
        "tissue_accuracy": float((labels == dseg).mean()),
        "tissue_majority_rate": float(majority),
        "lesion_dice": dice(found, truth),
        "lesion_precision": float(hits / found.sum()) if found.any() else math.nan,
        "lesion_recall": float(hits / truth.sum()) if truth.any() else math.nan,
        "lesion_threshold": LESION_THRESHOLD,
    }


# ---- on disk --------------------------------------------------------------------------------


def save_segmenters(segs: Segmenters, folder: Path) -> Path:
    """Write ``folder``/segmenters.pt and accuracy.json atomically (replacing the folder)."""
    content = {
        "format": FORMAT,
        "manifest_sha256": segs.manifest_sha256,
        "settings": segs.settings,
        "accuracy": finite_or_none(segs.accuracy),
        "tissue": {"classes": segs.tissue.classes, "in_channels": segs.tissue.in_channels,
                   "widths": list(segs.tissue.widths),
                   "state": segs.tissue.state_dict()},
        "lesion": {"classes": segs.lesion.classes, "in_channels": segs.lesion.in_channels,
                   "widths": list(segs.lesion.widths),
                   "state": segs.lesion.state_dict()},
    }
    folder = Path(folder)
    try:
        with atomic_dir(folder, overwrite=True) as tmp:
            torch.save(content, tmp / WEIGHTS)
            summary = {"manifest_sha256": segs.manifest_sha256, "settings": segs.settings,
                       **finite_or_none(segs.accuracy)}
            write_json(tmp / ACCURACY, summary)
    except OutputBusyError:
        pass  # another run on this cache is saving segmenters of the same data and settings
    segs.path = folder / WEIGHTS
    return segs.path


def load_segmenters(path: str | Path) -> Segmenters:
    """The segmenters saved at ``path`` (a segmenters.pt), in eval mode."""
    path = Path(path)
    try:
        content = torch.load(path, weights_only=True, map_location="cpu")
        if content.get("format") != FORMAT:
            raise ValueError(f"format {content.get('format')!r}, expected {FORMAT}")
        nets = []
        for name in ("tissue", "lesion"):
            spec = content[name]
            net = SegNet(spec["classes"], spec["in_channels"], tuple(spec["widths"]))
            net.load_state_dict(content[name]["state"])
            nets.append(net.to(memory_format=torch.channels_last).eval())
    except (OSError, RuntimeError, ValueError, KeyError, AttributeError) as err:
        raise InputError(f"{path}: cannot load the segmenters ({err})") from err
    return Segmenters(*nets, content["manifest_sha256"], content["settings"],
                      content["accuracy"], path)


def cohort_segmenters(
    cache: Cache, steps: int = STEPS, seed: int = 0, progress: bool = False
) -> Segmenters:
    """The segmenters of ``cache``: loaded from CACHE/segmenters when they were trained on this
    manifest, else trained and saved there (replacing stale ones)."""
    check_cache(cache)
    path = Path(cache.path) / FOLDER / WEIGHTS
    key = manifest_sha256(cache)
    if path.is_file():
        try:
            segs = load_segmenters(path)
        except InputError:
            segs = None  # unreadable (an older format, a broken file): train afresh below
        if segs is not None and segs.manifest_sha256 == key:
            return segs
    segs = train_segmenters(cache, steps=steps, seed=seed, progress=progress)
    save_segmenters(segs, path.parent)
    return segs
