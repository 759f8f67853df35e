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
