"""Apparent skin colour per subject beyond one number, and perceived gender x skin-tone group shares.

``skin_summary``: per subject (and pooled, ``subject == "all"``), the distribution of each image's
perceptual lightness L*, hue angle h* and ITA (the ``skin_tone`` probe's ``skin_lightness``, ``skin_hue`` and
``skin_tone`` scores; Thong, Joniak and Xiang, ICCV 2023): mean with a Student-t 95% interval, standard
deviation, median and quartiles, over the images with a measurement (one per image: its largest face, as
in the summary). Abstained images (no face, too few skin pixels) are counted beside them.

``intersectional``: per gender probe and subject, the shares of the six cells perceived gender x skin-tone
group among images with both votes, with simultaneous intervals over the six cells (all six hold together
at 95%): Bonferroni Clopper-Pearson, each cell's exact binomial interval at level 0.05 / 6. Goodman's intervals
were used before; a review simulation found them holding together only 80-85% of the time at n = 10-20 with a
dominant cell and rare ones (the usual occupation), where Bonferroni Clopper-Pearson held at 97-99% for about
the same width (3-10% wider on even cells, narrower on sparse ones). Skin-tone groups bin each image's L* at the midpoints between the L* of Monk
swatches 5 and 6 and of swatches 7 and 8 (``SKIN_GROUP_EDGES``, about 66.5 and 36.6): ``lighter`` is as
light as Monk 1-5, ``medium`` as Monk 6-7, ``darker`` as Monk 8-10. A face in a photo reads darker than a
flat swatch under shading, so read the groups as relative, not as Monk categories. Skin colour is never
mapped to race or ethnicity.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

POOLED = "all"
MEASURES: dict[str, str] = {"skin_lightness": "L*", "skin_hue": "h*", "skin_tone": "ITA"}
SKIN_GROUPS: tuple[str, ...] = ("darker", "medium", "lighter")
GENDERS: tuple[str, ...] = ("woman", "man")


def _swatch_edges() -> tuple[float, float]:
    from audit.probes.skin_tone import MONK_HEX, hex_to_rgb, rgb_to_lab

    lightness = rgb_to_lab(np.array([hex_to_rgb(h) for h in MONK_HEX], dtype=np.uint8))[:, 0]
    return float((lightness[6] + lightness[7]) / 2), float((lightness[4] + lightness[5]) / 2)


SKIN_GROUP_EDGES: tuple[float, float] = _swatch_edges()


def skin_group(lightness: np.ndarray | float) -> np.ndarray:
    """The ``SKIN_GROUPS`` label of each L* value."""
    return np.asarray(SKIN_GROUPS, dtype=object)[np.searchsorted(SKIN_GROUP_EDGES, np.asarray(lightness), side="right")]


def simultaneous_intervals(counts: np.ndarray, *, alpha: float = 0.05) -> np.ndarray:
    """``K x 2`` intervals for the K cell shares of ``counts`` that hold together with probability >= 1 - alpha:
    Bonferroni Clopper-Pearson (exact binomial at level alpha / K per cell); NaN rows when the counts are 0."""
    from statsmodels.stats.proportion import proportion_confint

    c = np.asarray(counts, dtype=np.int64)
    n = int(c.sum())
    if n == 0:
        return np.full((len(c), 2), np.nan)
    lo, hi = proportion_confint(c, n, alpha=alpha / len(c), method="beta")
    return np.column_stack([lo, hi])


def _images(generations: pd.DataFrame) -> pd.DataFrame:
    from prompts.suites import EDIT_TEMPLATE

    return generations.loc[generations["template"] != EDIT_TEMPLATE, ["image_id", "subject"]]


def skin_summary(generations: pd.DataFrame, skin_table: pd.DataFrame, *, confidence: float = 0.95) -> pd.DataFrame:
    """The ``bias/skin`` table (see the module docstring)."""
    from scipy import stats as st

    from audit.stats import pick
    from diffaudit.schema import BIAS_SKIN

    if skin_table.empty:
        return pd.DataFrame(columns=BIAS_SKIN.names)
    v = pick(skin_table)
    v = v[v["attribute"].isin(list(MEASURES))].merge(_images(generations), on="image_id")
    rows = []
    for (probe, attribute), group in v.groupby(["probe", "attribute"], sort=True):
        for subject, g in [(POOLED, group), *sorted(group.groupby("subject"), key=lambda kv: str(kv[0]))]:
            x = g.loc[~g["abstained"], "score"].dropna().to_numpy(dtype=float)
            n = len(x)
            mean = float(x.mean()) if n else np.nan
            sd = float(x.std(ddof=1)) if n > 1 else np.nan
            half = float(st.t.ppf((1 + confidence) / 2, n - 1) * sd / np.sqrt(n)) if n > 1 else np.nan
            q = np.percentile(x, [25, 50, 75]) if n else [np.nan] * 3
            rows.append(dict(probe=probe, attribute=attribute, measure=MEASURES[attribute], subject=str(subject),
                             n=n, abstained=int(g["abstained"].sum()), mean=mean, ci_low=mean - half,
                             ci_high=mean + half, sd=sd, median=q[1], q25=q[0], q75=q[2]))
    return pd.DataFrame(rows, columns=BIAS_SKIN.names)


def intersectional(generations: pd.DataFrame, probe_tables: Mapping[str, pd.DataFrame], *,
                   alpha: float = 0.05) -> pd.DataFrame:
    """The ``bias/intersectional`` table: perceived gender (each probe that labels it) x skin-tone group."""
    from audit.stats import pick
    from diffaudit.schema import BIAS_INTERSECTIONAL

    skin = probe_tables.get("skin_tone")
    if skin is None or skin.empty:
        return pd.DataFrame(columns=BIAS_INTERSECTIONAL.names)
    s = pick(skin)
    s = s[(s["attribute"] == "skin_lightness") & ~s["abstained"]]
    s = s.assign(skin_group=skin_group(s["score"].to_numpy(dtype=float)))[["image_id", "skin_group"]]
    cells = [(g, k) for g in GENDERS for k in SKIN_GROUPS]
    rows = []
    for probe, table in sorted(probe_tables.items()):
        if table.empty or "perceived_gender" not in set(table["attribute"]):
            continue
        v = pick(table)
        v = v[(v["attribute"] == "perceived_gender") & ~v["abstained"] & v["label"].isin(GENDERS)]
        both = v[["image_id", "label"]].merge(s, on="image_id").merge(_images(generations), on="image_id")
        for subject, g in [(POOLED, both), *sorted(both.groupby("subject"), key=lambda kv: str(kv[0]))]:
            counts = g.groupby(["label", "skin_group"]).size()
            c = np.array([int(counts.get(cell, 0)) for cell in cells])
            n = int(c.sum())
            ci = simultaneous_intervals(c, alpha=alpha)
            for (gender, group), k, (lo, hi) in zip(cells, c, ci, strict=True):
                rows.append(dict(gender_probe=probe, subject=str(subject), perceived_gender=gender, skin_group=group,
                                 count=int(k), n=n, share=k / n if n else np.nan, sim_ci_low=lo, sim_ci_high=hi))
    return pd.DataFrame(rows, columns=BIAS_INTERSECTIONAL.names)
