"""Sample-size planning: how many images per prompt an audit needs to see a given departure.

The question answered: with ``n`` usable images of one subject, does a two-sided test at level ``alpha``
detect, with probability ``power``, a true share ``baseline ± effect`` (e.g. the BLS share ± 10 points)?
The normal approximation on Cohen's arcsine effect size ``h = 2 asin(sqrt(p1)) - 2 asin(sqrt(p0))``
gives ``n = ((z_{1-alpha/2} + z_power) / h)^2`` (statsmodels ``NormalIndPower`` with ``ratio=0``, the
one-sample case); both directions are tried and the larger n is kept. The exact binomial power at that n
is reported beside it, and so is the n nearest it at which the exact test (the one ``summarize`` runs)
reaches the power; the plan draws the larger of the two (the exact power saw-tooths with n).

Many occupations mean many tests: ``bonferroni`` tests each at ``alpha / m``; ``bh`` uses Jung's (2005)
per-test level for a Benjamini-Hochberg FDR of ``alpha`` when ``m1`` of the ``m`` occupations truly
differ, ``alpha* = m1 * power * alpha / ((m - m1) * (1 - alpha))``, capped at ``alpha`` (BH never rejects
above ``alpha``; uncapped, 9 of 10 differing would plan 72 images where one test alone needs 194).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from diffaudit.errors import InputError

CORRECTIONS = ("bonferroni", "bh", "none")


@dataclass(frozen=True)
class Plan:
    """A planned sample size and the assumptions behind it."""

    effect: float
    power: float
    alpha: float
    baseline: float
    occupations: int
    correction: str
    alpha_per_test: float
    images_per_subject: int        # usable (non-abstained) images per subject, normal approximation
    exact_images_per_subject: int  # n nearest the textbook one at which the exact test reaches ``power``
    images_per_subject_drawn: int  # the larger of the two, inflated for the expected abstention rate
    images_per_prompt: int         # per (subject, template) prompt
    total_images: int
    exact_power: float             # exact binomial test power at images_per_subject (worst direction)
    assumptions: list[str] = field(default_factory=list)


def exact_power(n: int, p0: float, p1: float, alpha: float) -> float:
    """Power of the two-sided exact binomial test of ``p = p0`` (scipy's ``binomtest`` p-values: the sum
    of outcomes no more likely than the observed one) when the true share is ``p1``."""
    from scipy.stats import binom

    k = np.arange(n + 1)
    pmf0 = binom.pmf(k, n, p0)
    order = np.sort(pmf0)
    cum = np.cumsum(order)
    pvalue = cum[np.searchsorted(order, pmf0 * (1 + 1e-7), side="right") - 1]
    return float(binom.pmf(k, n, p1)[pvalue <= alpha].sum())


def _exact_n(start: int, p0: float, targets: list[float], alpha: float, power: float) -> int:
    """From the normal-approximation n, walk up until the exact test reaches ``power`` in both directions,
    or down while it still does: the exact n nearest the textbook one (the power saw-tooths with n)."""
    def reaches(m: int) -> bool:
        return min(exact_power(m, p0, p1, alpha) for p1 in targets) >= power

    m = start
    if reaches(m):
        while m > 1 and reaches(m - 1):
            m -= 1
        return m
    while not reaches(m):
        m += 1
    return m


def alpha_per_test(alpha: float, occupations: int, correction: str, differing: int | None, power: float) -> float:
    if correction not in CORRECTIONS:
        raise InputError(f"unknown correction {correction!r}; choose one of {', '.join(CORRECTIONS)}")
    if occupations == 1 or correction == "none":
        return alpha
    if correction == "bonferroni":
        return alpha / occupations
    if differing is None or not 1 <= differing < occupations:
        raise InputError(f"--correction bh needs --differing M1: how many of the {occupations} occupations "
                         "you expect to truly differ (1 <= M1 < occupations)")
    return min(alpha, differing * power * alpha / ((occupations - differing) * (1 - alpha)))


def plan(effect: float, *, power: float = 0.8, alpha: float = 0.05, baseline: float = 0.5, occupations: int = 1,
         correction: str = "bonferroni", differing: int | None = None, templates: int = 1,
         abstention: float = 0.0) -> Plan:
    """Images needed to detect a share ``baseline ± effect`` (see the module docstring)."""
    from statsmodels.stats.power import NormalIndPower
    from statsmodels.stats.proportion import proportion_effectsize

    checks = [(0 < effect < 1, "--effect must be in (0, 1)"), (0 < power < 1, "--power must be in (0, 1)"),
              (0 < alpha < 1, "--alpha must be in (0, 1)"), (0 < baseline < 1, "--baseline must be in (0, 1)"),
              (occupations >= 1, "--occupations must be >= 1"), (templates >= 1, "--templates must be >= 1"),
              (0 <= abstention < 1, "--abstention must be in [0, 1)")]
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    targets = [p for p in (baseline + effect, baseline - effect) if 0 < p < 1]
    if not targets:
        raise InputError(f"baseline {baseline} ± effect {effect} leaves (0, 1) on both sides")
    a = alpha_per_test(alpha, occupations, correction, differing, power)
    solver = NormalIndPower()
    sizes = {p1: math.ceil(solver.solve_power(effect_size=abs(proportion_effectsize(p1, baseline)), alpha=a,
                                              power=power, ratio=0, alternative="two-sided") - 1e-9)
             for p1 in targets}
    n = max(sizes.values())
    exact_n = _exact_n(n, baseline, targets, a, power)
    drawn = math.ceil(max(n, exact_n) / (1 - abstention) - 1e-9)
    per_prompt = math.ceil(drawn / templates)
    exact = min(exact_power(n, baseline, p1, a) for p1 in targets)
    assumptions = [
        f"two-sided test of one subject's share against {baseline:g} at level {a:.3g}"
        + (f" ({correction} over {occupations} occupations" + (f", {differing} expected to differ" if
           correction == "bh" else "") + ")" if occupations > 1 and correction != "none" else ""),
        f"true share {' or '.join(f'{p:g}' for p in targets)}; normal approximation on the arcsine "
        "effect size, larger n of the two directions",
        "images are independent draws (distinct seeds) and the probe is exact; probe errors shrink the "
        "visible effect by (sensitivity + specificity - 1): plan for effect x that factor",
        f"{abstention:.0%} of images expected to abstain; {templates} template(s) pooled per subject",
    ]
    return Plan(effect=effect, power=power, alpha=alpha, baseline=baseline, occupations=occupations,
                correction=correction, alpha_per_test=a, images_per_subject=n, exact_images_per_subject=exact_n,
                images_per_subject_drawn=drawn,
                images_per_prompt=per_prompt, total_images=per_prompt * templates * occupations,
                exact_power=exact, assumptions=assumptions)
