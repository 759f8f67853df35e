"""How far two probes agree: Cohen's kappa and raw agreement for every pair of probes that label the
same attribute (e.g. CLIP's and the face-attribute classifier's perceived gender), overall and per subject.

Each probe's vote per image is the one the summary counts (``audit.stats.pick``: the largest face).
An image enters a pair's figures when both probes gave it a label; images where one or both abstained are
counted beside them (``abstained_a``, ``abstained_b``), never as disagreements. Edit images are left out,
as in the summary.

- raw agreement ``p_o`` = share of images with the same label, with a Wilson score interval;
- Cohen's kappa (Cohen 1960) ``(p_o - p_e) / (1 - p_e)``, ``p_e = sum_k p_a(k) p_b(k)`` from the two
  probes' label margins over the same images. Kappa is undefined (null, no interval) when both probes give
  one and the same label to every image (``p_e = 1``). Its 95% interval: the 2.5 and 97.5 percentiles of
  kappa over 2,000 seeded draws of the table's cell probabilities from their Dirichlet posterior under a
  prior of total weight 1 spread evenly over the K x K cells (Perks' prior, ``1/K^2`` per cell). A
  percentile bootstrap of the table (multinomial resampling) was used before: it cannot leave the observed
  table's zero cells, so with high agreement, a share of 90% or more, or 10-30 images per subject (where
  audits live) it covered the true kappa 2-70% of the time and printed [0.00, 0.00] when one probe gave one
  label to every image. A review simulation (two raters, K = 2 and 4, kappa 0-0.98, label shares 50-97%,
  n = 10-1000) found this interval's coverage 0.80-1.0 (0.91-0.97 at n >= 100: a little under 95%, as
  percentile intervals of a discrete statistic are), at about the bootstrap's width where the bootstrap
  covered; the weakest cells are 97/3 label shares at n <= 30 and K = 4 at kappa 0.98 with n = 10.

Tables: ``bias/agreement`` (one row per pair, attribute and subject; subject ``all`` pools the images),
``bias/confusion`` (counts per label pair) and ``bias/agreement_images`` (each image's two votes, which the
dashboard's gallery of disagreements reads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np
import pandas as pd

POOLED = "all"
N_BOOT = 2000


def kappa(confusion: np.ndarray) -> float:
    """Cohen's kappa of a K x K confusion table (rows: probe A's labels, columns: probe B's); NaN if undefined."""
    c = np.asarray(confusion, dtype=float)
    n = c.sum()
    if n == 0:
        return float("nan")
    po = np.trace(c) / n
    pe = float((c.sum(axis=1) / n) @ (c.sum(axis=0) / n))
    return float("nan") if pe >= 1 - 1e-12 else float((po - pe) / (1 - pe))


def _kappas(draws: np.ndarray, k: int) -> np.ndarray:
    """Kappa of each bootstrap draw (``B x K*K`` counts); NaN where undefined."""
    c = draws.reshape(len(draws), k, k).astype(float)
    n = c.sum(axis=(1, 2))
    po = np.trace(c, axis1=1, axis2=2) / n
    pe = np.einsum("bi,bi->b", c.sum(axis=2), c.sum(axis=1)) / n**2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pe >= 1 - 1e-12, np.nan, (po - pe) / (1 - pe))


def kappa_interval(confusion: np.ndarray, *, confidence: float = 0.95, n_boot: int = N_BOOT,
                   seed: int = 0) -> tuple[float, float]:
    """Interval of kappa: percentiles of kappa over draws of the cell probabilities from their Dirichlet
    posterior (prior ``1/K^2`` per cell; see the module docstring). NaN when kappa is undefined or n < 2."""
    c = np.asarray(confusion, dtype=np.int64)
    n, k = int(c.sum()), c.shape[0]
    if n < 2 or not np.isfinite(kappa(c)):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = _kappas(rng.dirichlet(c.ravel() + 1.0 / k**2, size=n_boot), k)
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return float("nan"), float("nan")
    lo, hi = np.percentile(draws, [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100])
    return float(lo), float(hi)


def lowest_agreement_first(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``bias/agreement`` by kappa, then raw agreement, lowest first; undefined kappa (both probes gave
    every image one and the same label: 100% raw agreement) last."""
    return table.sort_values(["kappa", "raw_agreement"], na_position="last", kind="stable")


def pairs(labels: Mapping[str, Mapping[str, Sequence[str]]]) -> list[tuple[str, str, str]]:
    """(probe_a, probe_b, attribute) for every two probes that declare the same attribute, sorted."""
    out = []
    for a, b in combinations(sorted(labels), 2):
        for attribute in sorted(set(labels[a]) & set(labels[b])):
            out.append((a, b, attribute))
    return out


_IMAGE_COLUMNS = ["probe_a", "probe_b", "attribute", "image_id", "subject", "label_a", "label_b",
                  "abstain_reason_a", "abstain_reason_b"]


def agreement_images(generations: pd.DataFrame, probe_tables: Mapping[str, pd.DataFrame],
                     labels: Mapping[str, Mapping[str, Sequence[str]]]) -> pd.DataFrame:
    """Each image's votes from both probes of every pair (images probed by both; edits left out)."""
    from audit.stats import pick
    from prompts.suites import EDIT_TEMPLATE

    gens = generations.loc[generations["template"] != EDIT_TEMPLATE, ["image_id", "subject"]]
    votes = {name: pick(t) for name, t in probe_tables.items() if name in labels and len(t)}
    frames = []
    for a, b, attribute in pairs({k: v for k, v in labels.items() if k in votes}):
        va = votes[a][votes[a]["attribute"] == attribute]
        vb = votes[b][votes[b]["attribute"] == attribute]
        both = va.merge(vb, on="image_id", suffixes=("_a", "_b")).merge(gens, on="image_id")
        if both.empty:
            continue
        frames.append(both.assign(probe_a=a, probe_b=b, attribute=attribute)[_IMAGE_COLUMNS])
    if not frames:
        return pd.DataFrame(columns=_IMAGE_COLUMNS)
    return pd.concat(frames, ignore_index=True).sort_values(
        ["probe_a", "probe_b", "attribute", "subject", "image_id"], kind="stable").reset_index(drop=True)


def agreement(images: pd.DataFrame, labels: Mapping[str, Mapping[str, Sequence[str]]], *,
              confidence: float = 0.95, n_boot: int = N_BOOT, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``bias/agreement`` and ``bias/confusion`` tables from :func:`agreement_images`' rows."""
    from statsmodels.stats.proportion import proportion_confint

    from diffaudit.schema import BIAS_AGREEMENT, BIAS_CONFUSION

    rows, cells = [], []
    for (a, b, attribute), group in images.groupby(["probe_a", "probe_b", "attribute"], sort=True):
        space = list(dict.fromkeys([*labels.get(a, {}).get(attribute, ()), *labels.get(b, {}).get(attribute, ()),
                                    *sorted(set(group["label_a"].dropna()) | set(group["label_b"].dropna()))]))
        index = {lab: i for i, lab in enumerate(space)}
        for subject, g in [(POOLED, group), *sorted(group.groupby("subject"), key=lambda kv: str(kv[0]))]:
            voted = g[g["label_a"].notna() & g["label_b"].notna()]
            c = np.zeros((len(space), len(space)), dtype=np.int64)
            np.add.at(c, (voted["label_a"].map(index).to_numpy(dtype=int),
                          voted["label_b"].map(index).to_numpy(dtype=int)), 1)
            n, agree = int(c.sum()), int(np.trace(c))
            lo, hi = proportion_confint(agree, n, alpha=1 - confidence, method="wilson") if n else (np.nan, np.nan)
            klo, khi = kappa_interval(c, confidence=confidence, n_boot=n_boot, seed=seed)
            pe = float((c.sum(1) / n) @ (c.sum(0) / n)) if n else np.nan
            rows.append(dict(probe_a=a, probe_b=b, attribute=attribute, subject=str(subject), images=len(g), n=n,
                             agree=agree, raw_agreement=agree / n if n else np.nan, raw_ci_low=lo, raw_ci_high=hi,
                             chance_agreement=pe, kappa=kappa(c), kappa_ci_low=klo, kappa_ci_high=khi,
                             abstained_a=int(g["label_a"].isna().sum()), abstained_b=int(g["label_b"].isna().sum())))
            for i, la in enumerate(space):
                for j, lb in enumerate(space):
                    cells.append(dict(probe_a=a, probe_b=b, attribute=attribute, subject=str(subject),
                                      label_a=la, label_b=lb, count=int(c[i, j])))
    return (pd.DataFrame(rows, columns=BIAS_AGREEMENT.names),
            pd.DataFrame(cells, columns=BIAS_CONFUSION.names))
