"""The paper's claims as checks on a grid of evaluated runs (`pathanat reproduce`).

Each check reads the runs' ``metrics.json`` / ``analysis.json`` / ``validity.json`` (as dicts,
keyed by the run's config name, e.g. ``nvmp_ms`` or ``vae_ms_sup``) and returns
``{"claim", "source", "held", "clear", "evidence"}``. ``held`` compares point estimates; the
evidence gives the numbers (with 95% intervals where the metric has them). ``clear`` says whether
the intervals decide the verdict too: a comparison is decided when the two intervals do not
overlap, and a verdict is clear when every comparison it rests on is decided in its favour (held)
or one is decided against it (did not hold); None where the numbers have no intervals (the
propagation gain). Non-overlap of two 95% intervals is a conservative test of a difference (it
implies p < 0.006 for two independent normal estimates), so "within the intervals" is not
evidence of no difference. ``held`` is None when a run or a number the check needs is missing.

Over training seeds (``check_claims_over_seeds``) each claim is checked on each seed's grid, and
the verdict is unanimity: held when it held in every seed, not held when in none, and "mixed"
otherwise (``held`` False, ``held_in`` [k, N]). Unanimity is a sign test: a claim that is a coin
flip is unanimous over N seeds with probability 2^(1-N) (1 in 4 for 3 seeds), so the verdict
states N beside it, and how many seeds' verdicts were clear (``clear_in``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial

from pathanat.metrics import estimate_text
from pathanat.models.config import KIND_NAMES

VAE, NVMP_PLUS = KIND_NAMES["vae"], KIND_NAMES["nvmp+"]
STRUCTURED = tuple(name for name in KIND_NAMES.values() if name != VAE)  # as configs spell them
_estimate = partial(estimate_text, digits=4)
Results = Mapping[str, Mapping[str, dict | None]]


def _get(tree: dict | None, *keys: str):
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _claim(claim: str, source: str, held: bool | None, evidence: str,
           clear: bool | None = None) -> dict:
    return {"claim": claim, "source": source, "held": held, "clear": clear,
            "evidence": evidence}


def _decided(better: dict, worse: dict, higher_is_better: bool = True) -> int:
    """+1 when ``better``'s interval lies wholly on the better side of ``worse``'s, -1 when wholly
    on the worse side, 0 when they overlap (or an interval is missing)."""
    bounds = (better.get("ci_low"), better.get("ci_high"), worse.get("ci_low"),
              worse.get("ci_high"))
    if any(b is None or not math.isfinite(b) for b in bounds):
        return 0
    b_low, b_high, w_low, w_high = bounds
    if not higher_is_better:
        b_low, b_high, w_low, w_high = -b_high, -b_low, -w_high, -w_low
    return 1 if b_low > w_high else -1 if b_high < w_low else 0


def _clear(held: bool | None, decided: list[int]) -> bool | None:
    """Whether the intervals decide ``held`` (module docstring)."""
    if held is None:
        return None
    return all(d == 1 for d in decided) if held else any(d == -1 for d in decided)


def reconstruction_claims(results: Results, dataset: str) -> list[dict]:
    """Table 1: structured priors beat the mean-field VAE; NVMP+ is the best of the four."""
    kinds = (VAE, *STRUCTURED)
    psnr = {k: _get(results.get(f"{k}_{dataset}", {}).get("metrics.json"),
                    "reconstruction", "psnr") for k in kinds}
    nll = {k: _get(results.get(f"{k}_{dataset}", {}).get("metrics.json"),
                   "nll", "nats_per_slice") for k in kinds}
    evidence = "; ".join(f"{k}: PSNR {_estimate(psnr[k])} dB, NLL {_estimate(nll[k])} nats/slice"
                         for k in kinds)
    complete = all(psnr[k] and nll[k] for k in kinds)
    beat = best = None
    beat_decided, best_decided = [], []
    if complete:
        p = {k: psnr[k]["mean"] for k in kinds}
        n = {k: nll[k]["mean"] for k in kinds}
        beat = all(p[k] > p[VAE] and n[k] < n[VAE] for k in STRUCTURED)
        best = max(p, key=p.get) == NVMP_PLUS and min(n, key=n.get) == NVMP_PLUS
        beat_decided = [d for k in STRUCTURED for d in (
            _decided(psnr[k], psnr[VAE]), _decided(nll[k], nll[VAE], higher_is_better=False))]
        best_decided = [d for k in kinds if k != NVMP_PLUS for d in (
            _decided(psnr[NVMP_PLUS], psnr[k]),
            _decided(nll[NVMP_PLUS], nll[k], higher_is_better=False))]
    return [
        _claim("structured priors (nvae, nvmp, nvmp+) reconstruct better than the mean-field VAE "
               "(higher PSNR and lower NLL)", "Table 1", beat, evidence,
               _clear(beat, beat_decided)),
        _claim("nvmp+ has the best PSNR and NLL of the four kinds", "Table 1", best, evidence,
               _clear(best, best_decided)),
    ]


def _mean_anatomy_r2(analysis: dict | None, unit: str) -> float | None:
    """Mean over the unsupervised groups z_A (all but the configured z_P) of max(R2, 0): a negative
    test R2 means no linear information, so it counts as 0 rather than as noise below it."""
    r2 = _get(analysis, "table4", unit, "r2")
    z_p = _get(analysis, "z_p_configured")
    if not r2 or z_p is None:
        return None
    values = [max(v, 0.0) for g, v in r2.items() if g != f"z{z_p}" and v is not None
              and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def propagation_claim(results: Results) -> list[dict]:
    """Table 4: with z_P supervised, the autoregressive kinds' z_A gain lesion information; the
    VAE's does not. Gain = mean z_A R2 (supervised) - mean z_A R2 (unsupervised)."""
    gains: dict[str, dict[str, float | None]] = {}
    for kind in (VAE, *STRUCTURED):
        gains[kind] = {}
        for unit in ("slice", "subject"):
            sup = _mean_anatomy_r2(results.get(f"{kind}_ms_sup", {}).get("analysis.json"), unit)
            uns = _mean_anatomy_r2(results.get(f"{kind}_ms", {}).get("analysis.json"), unit)
            gains[kind][unit] = None if sup is None or uns is None else sup - uns
    def show(gain: float | None) -> str:
        return "n/a" if gain is None else f"{gain:+.3f}"

    evidence = "; ".join(f"{k}: {show(g['slice'])} (slice), {show(g['subject'])} (subject)"
                         for k, g in gains.items())
    slice_gain = {k: g["slice"] for k, g in gains.items()}
    held = None
    if all(v is not None for v in slice_gain.values()):
        held = all(slice_gain[k] > 0 and slice_gain[k] > slice_gain[VAE] for k in STRUCTURED)
    return [_claim(
        "supervising z_P propagates lesion information to the unsupervised groups z_A in the "
        "autoregressive kinds (gain in mean z_A Lasso R2, slice level, > 0 and > the VAE's)",
        "Table 4", held, evidence + " (gain = mean over z_A of max(R2, 0), supervised minus "
        "unsupervised)")]


def validity_claim(results: Results) -> list[dict]:
    """Fig. 1a: structured priors put fewer sampled lesions in invalid places than the VAE."""
    rates = {k: _get(results.get(f"{k}_ms", {}).get("validity.json"), "samples")
             for k in (VAE, *STRUCTURED)}
    real = _get(results.get("vae_ms", {}).get("validity.json"), "real", "invalid_fraction")

    def show(r: dict | None) -> str:
        if not r or r.get("invalid_fraction") is None:
            return "n/a"
        return _estimate({"mean": r["invalid_fraction"], "ci_low": r.get("ci_low"),
                      "ci_high": r.get("ci_high")})

    evidence = "; ".join(f"{k}: {show(r)}" for k, r in rates.items())
    evidence += f"; real test slices: {real:.4g}" if real is not None else ""
    # beside the verdict: the same decoders' rates on draws of the second-stage prior and on
    # reconstructions (the floor of a decoded image)
    for what, keys in (("second-stage draws", ("second_stage", "samples")),
                       ("reconstructions", ("reconstructions",))):
        beside = {k: _get(results.get(f"{k}_ms", {}).get("validity.json"), *keys)
                  for k in rates}
        if any(beside.values()):
            evidence += f"; {what}: " + ", ".join(f"{k} {show(r)}" for k, r in beside.items())
    held, decided = None, []
    if all(r and r.get("invalid_fraction") is not None for r in rates.values()):
        held = all(rates[k]["invalid_fraction"] < rates[VAE]["invalid_fraction"]
                   for k in STRUCTURED)
        decided = [_decided(rates[k], rates[VAE], higher_is_better=False) for k in STRUCTURED]
    return [_claim("structured priors place a smaller fraction of sampled lesion voxels in "
                   "invalid places (background, CSF, ventricles) than the mean-field VAE",
                   "Fig. 1a", held, "invalid fraction of lesion voxels in prior samples: "
                   + evidence, _clear(held, decided))]


def check_claims_over_seeds(by_seed: Sequence[Results], dataset: str) -> list[dict]:
    """The claims checked on each seed's results (one mapping per seed, keyed by config name as
    in ``check_claims``) and decided by unanimity (module docstring); a seed whose grid lacks a
    number leaves the claim unchecked."""
    if not by_seed:
        raise ValueError("by_seed: expected the results of one or more seeds")
    per_seed = [check_claims(results, dataset) for results in by_seed]
    if len(per_seed) == 1:
        return per_seed[0]
    out = []
    for checks in zip(*per_seed, strict=True):
        verdicts = [c["held"] for c in checks]
        held = None
        if None not in verdicts:
            held = all(verdicts)
        clear = [c["clear"] for c in checks]
        out.append({
            **_claim(checks[0]["claim"], checks[0]["source"], held,
                     " || ".join(f"seed {i}: {c['evidence']}" for i, c in enumerate(checks))),
            "held_in": None if held is None else [sum(verdicts), len(verdicts)],
            "clear_in": (None if held is None or None in clear
                         else [sum(clear), len(clear)]),
        })
    return out


def verdict_text(claim: Mapping) -> str:
    """held / did not hold / mixed, with the seed count when there are several seeds."""
    held, held_in = claim["held"], claim.get("held_in")
    if held is None:
        return "not checked (results missing)"
    if not held_in:
        clear = claim.get("clear")
        margin = ("" if clear is None
                  else " (intervals apart)" if clear else " (within the 95% intervals)")
        return ("held" if held else "did not hold") + margin
    k, n = held_in
    if k == n:
        text = f"held in all {n} seeds"
    elif k == 0:
        text = f"did not hold in any of {n} seeds"
    else:
        text = f"mixed: held in {k} of {n} seeds"
    clear_in = claim.get("clear_in")
    return text + (f"; the intervals decide {clear_in[0]} of the {n} verdicts" if clear_in else "")


def check_claims(results: Results, dataset: str) -> list[dict]:
    """Every claim the grid of ``dataset`` can check (supervision and validity need ``ms``)."""
    claims = reconstruction_claims(results, dataset)
    if dataset == "ms":
        claims += propagation_claim(results) + validity_claim(results)
    return claims
