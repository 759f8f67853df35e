"""Agreement of two probes on one attribute: Cohen's kappa matches scikit-learn's, raw agreement has its
Wilson interval, the bootstrap interval covers kappa, abstentions are counted apart, and every subject and
the pooled images get a row and a confusion table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.proportion import proportion_confint

from audit.agreement import agreement, agreement_images, kappa, kappa_interval, pairs
from audit.probes.base import frame, row
from diffaudit import schema

LABELS = {"p": {"perceived_gender": ("woman", "man"), "x": ("a",)}, "q": {"perceived_gender": ("woman", "man")}}


def confusion(a, b, space):
    c = np.zeros((len(space), len(space)), dtype=int)
    for x, y in zip(a, b, strict=True):
        c[space.index(x), space.index(y)] += 1
    return c


@pytest.mark.parametrize("seed", range(5))
def test_kappa_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    space = ["child", "young_adult", "middle_aged", "older_adult"]
    a = rng.choice(space, 200)
    b = np.where(rng.random(200) < 0.6, a, rng.choice(space, 200))  # 60% copied, the rest at random
    assert kappa(confusion(a, b, space)) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)


def test_kappa_edge_cases():
    assert kappa(np.array([[5, 0], [0, 0]])) != kappa(np.array([[5, 0], [0, 0]]))  # NaN: one label everywhere
    assert kappa(np.array([[3, 0], [0, 3]])) == 1.0
    assert kappa(np.zeros((2, 2))) != kappa(np.zeros((2, 2)))


def test_pairs_share_an_attribute():
    assert pairs(LABELS) == [("p", "q", "perceived_gender")]


def probe_rows(probe, labels):
    """A PROBES table: image i labelled labels[i] (None: abstained)."""
    return frame([row(f"img{i}", "perceived_gender", probe=probe, version="1", label=lab,
                      abstain_reason=None if lab else "low_margin") for i, lab in enumerate(labels)])


def test_agreement_tables_by_subject():
    a = ["woman", "woman", "man", "man", "woman", None, "man", "woman"]
    b = ["woman", "man", "man", "man", "woman", "man", None, "woman"]
    gens = pd.DataFrame({"image_id": [f"img{i}" for i in range(8)], "subject": ["nurse"] * 4 + ["ceo"] * 4,
                         "template": ["t"] * 8})
    images = agreement_images(gens, {"p": probe_rows("p", a), "q": probe_rows("q", b)}, LABELS)
    schema.to_arrow("bias/agreement_images", images)
    assert len(images) == 8 and images["label_a"].isna().sum() == 1
    table, cells = agreement(images, LABELS)
    schema.to_arrow("bias/agreement", table)
    schema.to_arrow("bias/confusion", cells)
    overall = table.set_index("subject").loc["all"]
    voted = [(x, y) for x, y in zip(a, b, strict=True) if x and y]
    agree = sum(x == y for x, y in voted)
    assert (overall["images"], overall["n"], overall["agree"]) == (8, 6, agree)
    assert (overall["abstained_a"], overall["abstained_b"]) == (1, 1)
    lo, hi = proportion_confint(agree, 6, method="wilson")
    assert overall["raw_ci_low"] == pytest.approx(lo) and overall["raw_ci_high"] == pytest.approx(hi)
    assert overall["kappa"] == pytest.approx(cohen_kappa_score(*zip(*voted, strict=True)))
    assert overall["kappa_ci_low"] <= overall["kappa"] <= overall["kappa_ci_high"]
    nurse = table.set_index("subject").loc["nurse"]
    assert (nurse["n"], nurse["agree"]) == (4, 3)
    c = cells[(cells["subject"] == "all")].set_index(["label_a", "label_b"])["count"]
    assert c[("woman", "man")] == 1 and c[("woman", "woman")] == 3 and c.sum() == 6
    assert set(table["subject"]) == {"all", "nurse", "ceo"}


def test_kappa_interval_covers_the_truth_mostly():
    """Two raters that copy each other 70% of the time (else draw at random, 50/50): true kappa 0.7."""
    rng = np.random.default_rng(1)
    hits = 0
    for t in range(100):
        a = rng.integers(0, 2, 150)
        b = np.where(rng.random(150) < 0.7, a, rng.integers(0, 2, 150))
        lo, hi = kappa_interval(confusion(a, b, [0, 1]), n_boot=500, seed=t)
        hits += lo <= 0.7 <= hi
    assert hits >= 88  # nominal 95


def population(marginal, kappa_true):
    """Cell probabilities of two raters with the same label shares ``marginal`` whose agreement has kappa
    ``kappa_true`` (rater B copies A with probability kappa_true, else draws independently)."""
    m = np.asarray(marginal, dtype=float)
    return (kappa_true * np.diag(m) + (1 - kappa_true) * np.outer(m, m)).ravel()


@pytest.mark.parametrize("marginal, kappa_true, n", [
    ([0.5, 0.5], 0.9, 20),            # high agreement, few images: the bootstrap covered 63%
    ([0.9, 0.1], 0.9, 30),            # an imbalanced occupation (90% one label): 49%
    ([0.97, 0.03], 0.5, 30),          # a near one-label occupation: 27%
    ([0.9, 0.1], 0.0, 100),           # chance agreement, imbalance, many images: 69%
    ([0.05, 0.6, 0.3, 0.05], 0.9, 30),  # four age groups: 82%
])
def test_kappa_interval_covers_where_agreement_is_high_or_labels_are_imbalanced(marginal, kappa_true, n):
    """Review (rev2) simulation: the percentile bootstrap of the confusion table collapsed onto the observed
    table exactly where audits live (per-occupation n of 20-30, shares of 90%+, two good classifiers)."""
    rng = np.random.default_rng(7)
    cells, k = population(marginal, kappa_true), len(marginal)
    hits = tried = 0
    for t in range(200):
        c = rng.multinomial(n, cells).reshape(k, k)
        if not np.isfinite(kappa(c)):
            continue  # undefined kappa has no interval
        lo, hi = kappa_interval(c, n_boot=500, seed=t)
        tried += 1
        hits += lo - 1e-9 <= kappa_true <= hi + 1e-9
    assert hits / tried >= 0.85, (hits, tried)


def test_kappa_interval_is_not_a_point_on_few_images():
    """One probe giving every image one label makes kappa exactly 0, and perfect agreement makes it 1, on any
    resample of the table: the bootstrap printed [0.00, 0.00] and [1.00, 1.00] on 15 and 10 images."""
    lo, hi = kappa_interval(np.array([[10, 5], [0, 0]]))  # probe A: "woman" on all 15 images
    assert kappa(np.array([[10, 5], [0, 0]])) == 0.0
    assert lo < 0 < hi and hi - lo > 0.2
    lo, hi = kappa_interval(np.array([[6, 0], [0, 4]]))  # 10 of 10 alike
    assert hi == pytest.approx(1.0, abs=1e-3) and lo < 0.8


def test_lowest_agreement_first_puts_undefined_kappa_last():
    """Undefined kappa means both probes gave one and the same label to every image: 100% raw agreement, so
    it belongs at the end of a "lowest agreement first" list, not the top (report and dashboard had it first)."""
    from audit.agreement import lowest_agreement_first

    t = pd.DataFrame({"subject": ["a", "b", "c", "d"], "kappa": [np.nan, 0.4, -0.1, 0.4],
                      "raw_agreement": [1.0, 0.7, 0.4, 0.6]})
    assert lowest_agreement_first(t)["subject"].tolist() == ["c", "d", "b", "a"]
