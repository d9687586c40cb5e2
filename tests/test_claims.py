"""The paper's claims checked on hand-made grid results whose verdicts are known."""

from __future__ import annotations

import pytest

from pathanat.evaluation.claims import check_claims, check_claims_over_seeds, verdict_text

KINDS = ("vae", "nvae", "nvmp", "nvmpplus")


def metrics(psnr: float, nll: float, half_width: float = 1.0) -> dict:
    """PSNR +- half_width dB, NLL +- 5 x half_width nats."""
    w = half_width
    return {"reconstruction": {"psnr": {"mean": psnr, "ci_low": psnr - w, "ci_high": psnr + w}},
            "nll": {"nats_per_slice": {"mean": nll, "ci_low": nll - 5 * w,
                                       "ci_high": nll + 5 * w}}}


def analysis(r2: dict[str, float], z_p: int = 2) -> dict:
    return {"z_p_configured": z_p,
            "table4": {"slice": {"r2": r2}, "subject": {"r2": r2}}}


def validity(fraction: float) -> dict:
    return {"samples": {"invalid_fraction": fraction, "ci_low": fraction / 2,
                        "ci_high": fraction * 2},
            "real": {"invalid_fraction": 0.01}}


def grid(psnr, nll, r2_unsup, r2_sup, invalid) -> dict:
    results = {}
    for i, kind in enumerate(KINDS):
        results[f"{kind}_ms"] = {"metrics.json": metrics(psnr[i], nll[i]),
                                 "analysis.json": analysis(r2_unsup[i]),
                                 "validity.json": validity(invalid[i])}
        results[f"{kind}_ms_sup"] = {"metrics.json": None, "analysis.json": analysis(r2_sup[i]),
                                     "validity.json": None}
    return results


def zs(*values: float) -> dict[str, float]:
    return {f"z{i}": v for i, v in enumerate(values)}


PAPER_LIKE = grid(
    psnr=(24.0, 25.0, 25.5, 26.8), nll=(900, 880, 860, 842),
    r2_unsup=[zs(0.2, 0.1, 0.3, 0.0, 0.0)] * 4,
    # the VAE keeps the supervision in z_P; the autoregressive kinds spread it to z_A
    r2_sup=[zs(0.2, 0.1, 0.6, -0.5, 0.0), zs(0.3, 0.2, 0.6, 0.0, 0.0),
            zs(0.5, 0.2, 0.6, 0.0, 0.0), zs(0.2, 0.4, 0.6, 0.1, 0.0)],
    invalid=(0.30, 0.10, 0.08, 0.05),
)


def verdicts(results: dict) -> list:
    return [c["held"] for c in check_claims(results, "ms")]


def test_paper_like_results_hold_every_claim():
    claims = check_claims(PAPER_LIKE, "ms")
    assert [c["held"] for c in claims] == [True, True, True, True]
    assert [c["source"] for c in claims] == ["Table 1", "Table 1", "Table 4", "Fig. 1a"]
    # the evidence carries the numbers, not only the verdict
    assert "vae: PSNR 24 [23, 25] dB" in claims[0]["evidence"]
    # nvae: mean over z0, z1, z3, z4 of max(R2, 0): (0.3 + 0.2) / 4 - (0.2 + 0.1) / 4 = +0.05
    assert "nvae: +0.050 (slice)" in claims[2]["evidence"]
    # the VAE's negative z3 counts as 0, not as a loss: gain 0
    assert "vae: +0.000 (slice)" in claims[2]["evidence"]
    assert "second-stage" not in claims[3]["evidence"]  # nothing to show beside


def test_the_validity_claim_shows_second_stage_and_reconstruction_rates_without_using_them():
    results = {k: dict(v) for k, v in PAPER_LIKE.items()}
    for i, kind in enumerate(KINDS):
        rates = validity((0.30, 0.10, 0.08, 0.05)[i])
        rates["second_stage"] = {"samples": {"invalid_fraction": 0.2 - 0.01 * i}}
        rates["reconstructions"] = {"invalid_fraction": 0.04}
        results[f"{kind}_ms"]["validity.json"] = rates
    claim = check_claims(results, "ms")[3]
    assert claim["held"] is True  # decided on the model's prior samples, as before
    assert "second-stage draws: vae 0.2, nvae 0.19" in claim["evidence"]
    assert "reconstructions: vae 0.04" in claim["evidence"]


def test_each_claim_fails_on_its_own_counterexample():
    worse = dict(PAPER_LIKE)
    worse["nvmp_ms"] = {**worse["nvmp_ms"], "metrics.json": metrics(23.0, 950)}
    assert verdicts(worse)[:2] == [False, True]  # nvmp+ is still the best

    not_best = dict(PAPER_LIKE)
    not_best["nvae_ms"] = {**not_best["nvae_ms"], "metrics.json": metrics(27.0, 800)}
    assert verdicts(not_best)[:2] == [True, False]

    no_spread = dict(PAPER_LIKE)
    no_spread["nvmp_ms_sup"] = {**no_spread["nvmp_ms_sup"],
                                "analysis.json": analysis(zs(0.2, 0.1, 0.7, 0.0, 0.0))}
    assert verdicts(no_spread)[2] is False

    invalid = dict(PAPER_LIKE)
    invalid["nvmpplus_ms"] = {**invalid["nvmpplus_ms"], "validity.json": validity(0.5)}
    assert verdicts(invalid)[3] is False


def test_missing_results_leave_a_claim_unchecked_not_decided():
    partial = {k: v for k, v in PAPER_LIKE.items() if not k.endswith("_sup")}
    partial["nvmp_ms"] = {**partial["nvmp_ms"], "validity.json": None}
    held = verdicts(partial)
    assert held == [True, True, None, None]


@pytest.mark.parametrize("dataset", ["ad"])
def test_ad_checks_only_reconstruction(dataset):
    results = {f"{k}_ad": {"metrics.json": metrics(25 + i, 900 - i), "analysis.json": None,
                           "validity.json": None} for i, k in enumerate(KINDS)}
    claims = check_claims(results, dataset)
    assert [c["held"] for c in claims] == [True, True]


def test_over_seeds_a_claim_holds_only_when_every_seed_holds_it():
    not_best = dict(PAPER_LIKE)
    not_best["nvae_ms"] = {**not_best["nvae_ms"], "metrics.json": metrics(27.0, 800)}
    invalid = dict(PAPER_LIKE)
    invalid["nvmpplus_ms"] = {**invalid["nvmpplus_ms"], "validity.json": validity(0.5)}
    # seed 1 loses "nvmp+ best", seed 2 loses both it and the validity claim
    both = {**not_best, "nvmpplus_ms": invalid["nvmpplus_ms"]}
    claims = check_claims_over_seeds([PAPER_LIKE, not_best, both], "ms")
    assert [c["held"] for c in claims] == [True, False, True, False]
    assert [c["held_in"] for c in claims] == [[3, 3], [1, 3], [3, 3], [2, 3]]
    # PAPER_LIKE's nvae and vae PSNR intervals overlap, so no seed decides claim 0; not_best's
    # nvae NLL interval lies below nvmp+'s, deciding claim 1's "did not hold" in seeds 1 and 2;
    # the propagation gain has no interval
    assert [verdict_text(c) for c in claims] == [
        "held in all 3 seeds; the intervals decide 0 of the 3 verdicts",
        "mixed: held in 1 of 3 seeds; the intervals decide 2 of the 3 verdicts",
        "held in all 3 seeds",
        "mixed: held in 2 of 3 seeds; the intervals decide 0 of the 3 verdicts"]
    assert claims[0]["evidence"].startswith("seed 0: vae: PSNR 24 [23, 25] dB")
    assert "seed 2: " in claims[0]["evidence"]
    # a claim that fails in every seed, and one that a seed cannot check
    worse = dict(PAPER_LIKE)
    worse["nvmp_ms"] = {**worse["nvmp_ms"], "metrics.json": metrics(23.0, 950)}
    partial = {k: v for k, v in PAPER_LIKE.items() if not k.endswith("_sup")}
    claims = check_claims_over_seeds([worse, worse], "ms")
    assert verdict_text(claims[0]).startswith("did not hold in any of 2 seeds")
    claims = check_claims_over_seeds([PAPER_LIKE, partial], "ms")
    assert claims[2]["held"] is None and claims[2]["held_in"] is None
    assert verdict_text(claims[2]) == "not checked (results missing)"
    # one seed: the plain verdicts, as check_claims
    assert check_claims_over_seeds([PAPER_LIKE], "ms") == check_claims(PAPER_LIKE, "ms")


def with_metrics(results: dict, psnr, nll, half_width: float) -> dict:
    out = dict(results)
    for i, kind in enumerate(KINDS):
        out[f"{kind}_ms"] = {**out[f"{kind}_ms"],
                             "metrics.json": metrics(psnr[i], nll[i], half_width)}
    return out


def test_a_verdict_is_clear_only_when_the_intervals_decide_it():
    psnr, nll = (24.0, 26.0, 28.0, 30.0), (900, 880, 860, 840)
    # +-0.5 dB / +-2.5 nats: every pair of intervals apart
    apart = check_claims(with_metrics(PAPER_LIKE, psnr, nll, 0.5), "ms")
    assert [c["clear"] for c in apart[:2]] == [True, True]
    assert verdict_text(apart[0]) == "held (intervals apart)"
    # +-1.5 dB: neighbours overlap (24 +- 1.5 and 26 +- 1.5), so neither verdict is decided
    close = check_claims(with_metrics(PAPER_LIKE, psnr, nll, 1.5), "ms")
    assert [c["held"] for c in close[:2]] == [True, True]
    assert [c["clear"] for c in close[:2]] == [False, False]
    assert verdict_text(close[0]) == "held (within the 95% intervals)"
    # "nvmp+ best" fails with nvae clearly above it on PSNR: clearly not held
    beaten = check_claims(with_metrics(PAPER_LIKE, (24.0, 34.0, 28.0, 30.0), nll, 0.5), "ms")
    assert beaten[1]["held"] is False and beaten[1]["clear"] is True
    assert verdict_text(beaten[1]) == "did not hold (intervals apart)"
    # lower is better for NLL: nvmp+'s NLL interval clearly above nvae's decides against it
    worse_nll = check_claims(with_metrics(PAPER_LIKE, psnr, (900, 800, 860, 840), 0.5), "ms")
    assert worse_nll[1]["held"] is False and worse_nll[1]["clear"] is True


def test_the_validity_verdict_reads_the_rates_intervals_and_the_gain_has_none():
    claims = check_claims(PAPER_LIKE, "ms")  # vae 0.30 [0.15, 0.6] against 0.05..0.10 [.., 0.2]
    assert claims[3]["held"] is True and claims[3]["clear"] is False
    far = dict(PAPER_LIKE)
    far["vae_ms"] = {**far["vae_ms"], "validity.json": validity(0.9)}  # [0.45, 1.8]
    assert check_claims(far, "ms")[3]["clear"] is True
    assert claims[2]["clear"] is None and verdict_text(claims[2]) == "held"
