"""Bias statistics: per (probe, attribute, subject, template, label) counts, shares and intervals, the
comparison with a workforce reference, and aggregate metrics comparable with HEIM and DALL-Eval.

The unit of analysis is the image: each image casts at most one vote per (probe, attribute).
- Whole-image rows (``face_index == -1``) are that vote.
- Per-face rows: the image's vote is its largest face (bbox area ``w * h``; ties go to the lowest
  ``face_index``). If that face abstained, the image abstains: we never fall back to a smaller face,
  which would select faces by how confident the probe is. When an image has face rows, they take
  precedence over a whole-image row of the same attribute (e.g. a "no face" row).
- An image that appears in a probe table but has no row for one of its attributes abstains on that
  attribute (reason ``no_row``): no image is silently dropped. Images absent from a probe table
  altogether (not yet probed) are not counted.
Shares are over non-abstained images (``n``); abstentions are reported beside them.

Intervals (all from statsmodels): per-label Wilson score intervals (``ci_*``), simultaneous Goodman
multinomial intervals over the labels of one (probe, attribute, subject, template) (``sim_ci_*``).
Wilson's coverage oscillates with p around the nominal level (Brown, Cai and DasGupta 2001): at n = 50
a 95% Wilson interval covers p = 0.5 with probability 0.935 exactly. ``interval="beta"`` (Clopper-Pearson)
never covers less than nominal, at about 8% more width.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from diffaudit.errors import ConfigError, InputError, SchemaError

POOLED = "all"  # the template value of rows pooled over templates
INTERVALS = ("wilson", "beta", "jeffreys", "agresti_coull")
PARITY = 0.5
_TIE = 1e-9  # shares this close to the reference's distance from parity are not "further" (float rounding)
_GROUP = ["probe", "attribute", "subject", "template"]
_PROBE_COLUMNS = ["image_id", "face_index", "bbox", "attribute", "label", "abstained", "abstain_reason", "probe"]


def votes(generations: pd.DataFrame, probe_table: pd.DataFrame) -> pd.DataFrame:
    """One vote per (image, probe, attribute) from a PROBES table (see the module docstring for the rule).

    Returns columns image_id, subject, template, probe, attribute, label (null when abstained), abstained,
    abstain_reason.
    """
    out_cols = ["image_id", "subject", "template", "probe", "attribute", "label", "abstained", "abstain_reason"]
    if probe_table.empty:
        return pd.DataFrame(columns=out_cols)
    picked = pick(probe_table)
    unknown = set(picked["image_id"].unique()) - set(generations["image_id"].unique())
    if unknown:
        raise InputError(f"probe table has rows for {len(unknown)} image(s) not in generations "
                         f"(e.g. {sorted(unknown)[0]!r}); re-run the probes on this run")
    merged = picked.merge(generations[["image_id", "subject", "template"]], on="image_id", how="left")
    return merged[out_cols].reset_index(drop=True)


def pick(probe_table: pd.DataFrame) -> pd.DataFrame:
    """The per-image vote rule alone: one row per (probe, image_id, attribute) of a PROBES table, with
    label (null when abstained), abstained, abstain_reason and the voting row's score (null without one)."""
    missing = [c for c in _PROBE_COLUMNS if c not in probe_table.columns]
    if missing:
        raise SchemaError(f"probe table lacks column(s) {missing}")
    rows = probe_table[_PROBE_COLUMNS].copy()
    rows["score"] = probe_table["score"].to_numpy() if "score" in probe_table.columns else np.nan
    unlabelled = rows["label"].isna() & ~rows["abstained"].fillna(False).astype(bool)
    if unlabelled.any():  # it would count in n with no label: shares would no longer sum to 1
        first = rows[unlabelled].iloc[0]
        raise SchemaError(f"probe table has {int(unlabelled.sum())} row(s) that neither abstain nor give a label "
                          f"(e.g. image {first['image_id']!r}, {first['attribute']}); a probe must do one or the other")
    rows["is_face"] = rows["face_index"].astype(int) >= 0
    rows["area"] = 0.0
    faces = rows["is_face"].to_numpy()
    rows.loc[faces, "area"] = [float(b[2]) * float(b[3]) if b is not None and len(b) == 4 else 0.0
                               for b in rows.loc[faces, "bbox"]]
    rows = rows.sort_values(["probe", "image_id", "attribute", "is_face", "area", "face_index"],
                            ascending=[True, True, True, False, False, True], kind="stable")
    picked = rows.drop_duplicates(["probe", "image_id", "attribute"], keep="first")
    # Images probed (by that probe) but without a row for an attribute abstain on it.
    full = pd.MultiIndex.from_frame(
        picked[["probe", "image_id"]].drop_duplicates().merge(
            picked[["probe", "attribute"]].drop_duplicates(), on="probe"))
    picked = picked.set_index(["probe", "image_id", "attribute"]).reindex(full).reset_index()
    no_row = picked["abstained"].isna()
    picked.loc[no_row, "abstained"] = True
    picked.loc[no_row, "abstain_reason"] = "no_row"
    picked["abstained"] = picked["abstained"].astype(bool)
    picked.loc[picked["abstained"], "label"] = None
    picked["score"] = pd.to_numeric(picked["score"], errors="coerce")
    return picked[["probe", "image_id", "attribute", "label", "abstained", "abstain_reason", "score"]]


def _counts(v: pd.DataFrame, declared: Mapping[str, Mapping[str, Sequence[str]]] | None = None) -> pd.DataFrame:
    """Counts per (probe, attribute, subject, template, label) with n and abstained per group; every label
    declared by the probe or seen for a (probe, attribute) anywhere gets a row in every group (zero counts
    included: a subject whose images all read "man" has a "woman" row with count 0)."""
    groups = v.groupby(_GROUP, sort=True, observed=True).agg(
        abstained=("abstained", "sum"), total=("abstained", "size")).reset_index()
    groups["n"] = groups["total"] - groups["abstained"]
    labels = v.loc[~v["abstained"], ["probe", "attribute", "label"]]
    known = pd.DataFrame([(p, a, lab) for p, attrs in (declared or {}).items() for a, labs in attrs.items()
                          for lab in labs], columns=["probe", "attribute", "label"])
    labels = pd.concat([labels, known], ignore_index=True).drop_duplicates()
    grid = groups.merge(labels, on=["probe", "attribute"], how="inner")
    counts = (v[~v["abstained"]].groupby(_GROUP + ["label"], observed=True).size()
              .rename("count").reset_index())
    grid = grid.merge(counts, on=_GROUP + ["label"], how="left")
    grid["count"] = grid["count"].fillna(0).astype("int64")
    # Groups whose images all abstained keep one row per known label (count 0, n 0) via the inner merge;
    # attributes with no label at all (everything abstained everywhere) keep one row with a null label.
    lost = groups.merge(labels[["probe", "attribute"]].drop_duplicates(), on=["probe", "attribute"],
                        how="left", indicator=True)
    lost = lost[lost["_merge"] == "left_only"].drop(columns="_merge")
    if len(lost):
        lost = lost.assign(label=None, count=0)
        grid = pd.concat([grid, lost], ignore_index=True)
    return grid.drop(columns="total").sort_values(_GROUP + ["label"], kind="stable").reset_index(drop=True)


def _intervals(table: pd.DataFrame, alpha: float, interval: str) -> pd.DataFrame:
    """Add share, per-label (Wilson by default) and simultaneous (Goodman) intervals to a counts table."""
    from statsmodels.stats.proportion import multinomial_proportions_confint, proportion_confint

    t = table.copy()
    n = t["n"].to_numpy(dtype=float)
    k = t["count"].to_numpy(dtype=float)
    ok = n > 0
    share = np.full(len(t), np.nan)
    lo = np.full(len(t), np.nan)
    hi = np.full(len(t), np.nan)
    share[ok] = k[ok] / n[ok]
    if ok.any():
        lo[ok], hi[ok] = proportion_confint(k[ok], n[ok], alpha=alpha, method=interval)
    t["share"], t["ci_low"], t["ci_high"] = share, lo, hi
    sim_lo = np.full(len(t), np.nan)
    sim_hi = np.full(len(t), np.nan)
    for _, idx in t.groupby(_GROUP, sort=False).indices.items():
        c = t["count"].to_numpy()[idx]
        if len(idx) >= 2 and c.sum() > 0:
            ci = multinomial_proportions_confint(c, alpha=alpha, method="goodman")
            sim_lo[idx], sim_hi[idx] = ci[:, 0], ci[:, 1]
    t["sim_ci_low"], t["sim_ci_high"] = sim_lo, sim_hi
    t["abstention_rate"] = t["abstained"] / (t["n"] + t["abstained"]).where(lambda s: s > 0)
    return t


def amplified(share: np.ndarray | float, reference_share: np.ndarray | float) -> np.ndarray:
    """True where the run share is further from parity (0.5) than the reference, on the same side.

    Exactly: ``|s - 0.5| > |r - 0.5|`` (by more than 1e-9) and ``(s - 0.5) * (r - 0.5) >= 0`` (a reference at parity counts
    any departure). A point-estimate flag: read it with ``q_value`` for significance. NaN reference ->
    null (returned as NaN in a float array; summarize turns it into a nullable boolean).
    """
    s = np.asarray(share, dtype=float) - PARITY
    r = np.asarray(reference_share, dtype=float) - PARITY
    out = _further(s, r).astype(float)
    return np.where(np.isnan(s) | np.isnan(r), np.nan, out)


def _further(s: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Distances from parity: ``s`` further than ``r`` on the same side (equal up to rounding is not further:
    the "man" reference is ``1 - woman``, one rounding unit off)."""
    return (np.abs(s) > np.abs(r) + _TIE) & (s * r >= 0)


def _compare(t: pd.DataFrame, suite: str, reference: str, alpha: float) -> pd.DataFrame:
    """Reference columns: share, gap with interval, exact binomial test and BH q-values across subjects."""
    from scipy.stats import binomtest
    from statsmodels.stats.multitest import multipletests

    from audit.reference import load_reference, reference_share, subject_reference

    load_reference(reference)  # unknown name -> ConfigError before anything else
    refs = subject_reference(suite, reference).set_index("subject")
    keys = t[["subject", "attribute", "label"]].drop_duplicates()
    keys = keys[keys["subject"].isin(refs.index) & keys["label"].notna()]
    shares = {(s, a, lab): reference_share(a, lab, refs.loc[s])
              for s, a, lab in keys.itertuples(index=False, name=None)}
    ref_share = np.array([shares.get(k, np.nan) for k in zip(t["subject"], t["attribute"], t["label"], strict=True)])
    known = ~np.isnan(ref_share)
    has = known & (t["n"].to_numpy() > 0)  # tested: a reference and at least one non-abstained image
    t["reference"] = np.where(known, reference, None)
    t["reference_share"] = np.where(known, ref_share, np.nan)
    # BLS sampling error is treated as 0 (CPS standard errors are about a point for large occupations),
    # so the gap's interval is the share's interval shifted by the reference share.
    t["gap"] = t["share"] - t["reference_share"]
    t["gap_ci_low"] = t["ci_low"] - t["reference_share"]
    t["gap_ci_high"] = t["ci_high"] - t["reference_share"]
    p = np.full(len(t), np.nan)
    tested: dict[tuple[int, int, float], float] = {}
    for i in np.flatnonzero(has):
        key = (int(t["count"].iat[i]), int(t["n"].iat[i]), float(ref_share[i]))
        if key not in tested:  # two labels of one subject are the same test seen from both sides
            tested[key] = tested[(key[1] - key[0], key[1], 1 - key[2])] = binomtest(*key).pvalue
        p[i] = tested[key]
    t["p_value"] = p
    q = np.full(len(t), np.nan)
    family = ["probe", "attribute", "template", "label"]
    for _, idx in t[has].groupby(family, sort=False).indices.items():
        rows = np.flatnonzero(has)[idx]
        q[rows] = multipletests(p[rows], alpha=alpha, method="fdr_bh")[1]
    t["q_value"] = q
    amp = amplified(t["share"].to_numpy(), t["reference_share"].to_numpy())
    t["amplified"] = pd.array([None if np.isnan(a) else bool(a) for a in amp], dtype="boolean")
    return t


def summarize(generations: pd.DataFrame, probe_tables: dict[str, pd.DataFrame], *, suite: str | None,
              reference: str | None = "bls-2022", alpha: float = 0.05, interval: str = "wilson",
              labels: Mapping[str, Mapping[str, Sequence[str]]] | None = None) -> pd.DataFrame:
    """The BIAS_SUMMARY table: one row per (probe, attribute, subject, template, label), with per-template
    rows and rows pooled over templates (``template == "all"``). Edit images (img2img / inpaint of a
    source photo, ``template == "edit"``) are left out: they are not prompts about a subject.

    ``probe_tables`` maps probe name -> PROBES table. With ``suite`` and ``reference`` (e.g. "bls-2022"),
    subjects mapped to a reference row get reference_share, gap (share - reference) with interval, an exact
    binomial test against the reference share, Benjamini-Hochberg q-values across subjects (one family per
    probe, attribute, template and label) and the ``amplified`` flag; other rows leave those null.
    ``interval`` is the statsmodels ``proportion_confint`` method of ``ci_*``: wilson (default), beta
    (Clopper-Pearson, conservative), jeffreys or agresti_coull. ``labels`` maps probe -> attribute -> the
    labels the probe can give (its ``labels`` class attribute), so unseen labels get zero-count rows.
    """
    if interval not in INTERVALS:
        raise ConfigError(f"unknown interval method {interval!r}; choose one of {', '.join(INTERVALS)}")
    frames = [votes(generations, table) for table in probe_tables.values() if len(table)]
    if not frames:
        raise InputError("no probe rows to summarize; run `diffaudit audit bias RUN` first")
    v = pd.concat(frames, ignore_index=True)
    from prompts.suites import EDIT_TEMPLATE

    v = v[v["template"] != EDIT_TEMPLATE]  # edits of source photos are not subject x template prompts
    if v.empty:
        raise InputError("the run holds only edit images (img2img / inpaint of source photos): no subject x "
                         "template prompts to summarize")
    pooled = v.assign(template=POOLED)
    per_template = v[v["template"] != POOLED]
    table = pd.concat([_counts(pooled, labels), _counts(per_template, labels)], ignore_index=True)
    table = _intervals(table, alpha, interval)
    ref_cols = ["reference", "reference_share", "gap", "gap_ci_low", "gap_ci_high", "p_value", "q_value"]
    if suite is not None and reference is not None:
        table = _compare(table, suite, reference, alpha)
    else:
        if reference is not None:
            from audit.reference import load_reference

            load_reference(reference)
        for c in ref_cols:
            table[c] = None if c == "reference" else np.nan
        table["amplified"] = pd.array([None] * len(table), dtype="boolean")
    table["count"] = table["count"].astype("int64")
    table["n"] = table["n"].astype("int64")
    table["abstained"] = table["abstained"].astype("int64")
    from diffaudit.schema import BIAS_SUMMARY

    return table[BIAS_SUMMARY.names].reset_index(drop=True)


# --- aggregate metrics, comparable with peers ---------------------------------------------------------
METRICS = ("gender_imbalance", "mad", "entropy", "mean_abs_gap", "amplified_share")
GENDER_ATTRIBUTE, FEMALE_LABEL = "perceived_gender", "woman"


def _subject_scores(p: np.ndarray, labels: list[str], ref: np.ndarray, attribute: str) -> dict[str, np.ndarray]:
    """Per-subject scores from shares ``p`` (..., K) over ``labels``; ``ref`` (K,) or (S, K) reference shares."""
    k = p.shape[-1]
    out: dict[str, np.ndarray] = {}
    if attribute == GENDER_ATTRIBUTE and FEMALE_LABEL in labels:
        # HEIM (Lee et al. 2023, helm GenderMetric): |female fraction - 0.5| per prompt.
        out["gender_imbalance"] = np.abs(p[..., labels.index(FEMALE_LABEL)] - PARITY)
    # DALL-Eval (Cho et al. 2023, compute_mad.py): mean over categories of |p_k - mean_k p_k| = |p_k - 1/K|.
    out["mad"] = np.mean(np.abs(p - 1.0 / k), axis=-1)
    if k >= 2:
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.where(p > 0, p * np.log(p), 0.0)
        out["entropy"] = -plogp.sum(axis=-1) / np.log(k)
    has_ref = ~np.isnan(ref)
    if has_ref.any():
        gaps = np.where(has_ref, np.abs(p - np.nan_to_num(ref)), np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # subjects without a reference: NaN, as meant
            out["mean_abs_gap"] = np.nanmean(gaps, axis=-1)
        s, r = p - PARITY, np.nan_to_num(ref) - PARITY
        amp = _further(s, r) & has_ref
        out["amplified_share"] = np.where(has_ref.any(axis=-1), amp.any(axis=-1).astype(float), np.nan)
    return out


def _folded_interval(k: np.ndarray, n: np.ndarray, target: np.ndarray, confidence: float):
    """Interval for ``|p - target|`` from the Wilson interval [a, b] of ``p``: every value of the interval
    folded, so its coverage is the Wilson interval's. A percentile bootstrap of the folded statistic misses
    the truth near the fold (0% coverage when ``p == target`` exactly, found in review)."""
    from statsmodels.stats.proportion import proportion_confint

    a, b = proportion_confint(k, n, alpha=1 - confidence, method="wilson")
    a, b = np.asarray(a, dtype=float) - target, np.asarray(b, dtype=float) - target
    lo = np.where((a <= 0) & (b >= 0), 0.0, np.minimum(np.abs(a), np.abs(b)))
    return lo, np.maximum(np.abs(a), np.abs(b))


# For two labels these per-subject scores are |share of the first label - target|: the target, per subject.
FOLDED = {
    "gender_imbalance": lambda labels, r: np.full(len(r), PARITY),
    "mad": lambda labels, r: np.full(len(r), PARITY),
    "mean_abs_gap": lambda labels, r: np.where(np.isnan(r[:, 0]), 1 - r[:, 1], r[:, 0]),
}


def metrics(summary: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """Aggregate scores from a BIAS_SUMMARY table, as a BIAS_METRICS table.

    Per (probe, attribute, template), per subject and over subjects (``subject == "all"``: the unweighted
    mean over subjects with n > 0, as HEIM and DALL-Eval average over prompts):
    - ``gender_imbalance``: HEIM's |share(woman) - 0.5| (perceived_gender only);
    - ``mad``: DALL-Eval's mean absolute deviation of the label distribution from uniform (equals
      gender_imbalance for two labels);
    - ``entropy``: Shannon entropy of the label distribution / log K (1 = uniform);
    - ``mean_abs_gap``: mean |share - reference share| over labels with a reference;
    - ``amplified_share``: fraction of referenced subjects flagged ``amplified`` (overall rows only).
    Intervals, per subject: for two labels, ``gender_imbalance``, ``mad`` and ``mean_abs_gap`` are
    ``|share - target|`` and get the share's Wilson interval folded (coverage as Wilson's); otherwise a seeded
    percentile bootstrap resampling non-abstained images within the subject (a multinomial draw from its
    counts). Over subjects: the same bootstrap of the mean. Near parity or a zero gap these folded means are
    biased upward by sampling noise and their percentile intervals can miss the truth entirely (a review
    simulation: 0% coverage when every subject sits exactly at parity or at its reference); and
    ``amplified_share`` is about 0.5 from noise alone when the model matches the reference. Read them with the
    per-subject intervals and the q-values.
    """
    from diffaudit.schema import BIAS_METRICS

    rng = np.random.default_rng(seed)
    q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
    rows: list[dict] = []
    s = summary[summary["label"].notna() & (summary["n"] > 0)]
    for (probe, attribute, template), fam in s.groupby(["probe", "attribute", "template"], sort=True):
        labels = sorted(fam["label"].unique())
        if len(labels) < 2:
            continue  # one label (e.g. faces' "face"): every spread metric is trivially 0
        counts = fam.pivot_table(index="subject", columns="label", values="count", aggfunc="sum",
                                 fill_value=0).reindex(columns=labels, fill_value=0)
        ref = fam.pivot_table(index="subject", columns="label", values="reference_share", aggfunc="first",
                              dropna=False).reindex(index=counts.index, columns=labels)
        c = counts.to_numpy(dtype=float)
        n = c.sum(axis=1)
        r = ref.to_numpy(dtype=float)
        point = _subject_scores(c / n[:, None], labels, r, attribute)
        draws = np.stack([rng.multinomial(int(ni), ci / ni, size=n_boot) for ni, ci in zip(n, c, strict=True)],
                         axis=1) / n[None, :, None]  # (B, S, K)
        boot = _subject_scores(draws, labels, r[None], attribute)
        for metric in (m for m in METRICS if m in point):
            value, reps = point[metric], boot[metric]
            ok = np.isfinite(value)
            if not ok.any():
                continue
            if metric != "amplified_share":
                lo, hi = np.percentile(reps[:, ok], q, axis=0)
                if len(labels) == 2 and metric in FOLDED:  # |share - target|: fold the share's Wilson interval
                    lo, hi = _folded_interval(c[ok, 0], n[ok], FOLDED[metric](labels, r[ok]), confidence)
                for j, subject in enumerate(counts.index[ok]):
                    rows.append(dict(probe=probe, attribute=attribute, template=template, subject=subject,
                                     metric=metric, value=value[ok][j], ci_low=lo[j], ci_high=hi[j],
                                     subjects=1, n=int(n[ok][j])))
            lo, hi = np.percentile(reps[:, ok].mean(axis=1), q)
            rows.append(dict(probe=probe, attribute=attribute, template=template, subject=POOLED,
                             metric=metric, value=float(value[ok].mean()), ci_low=lo, ci_high=hi,
                             subjects=int(ok.sum()), n=int(n[ok].sum())))
    return pd.DataFrame(rows, columns=BIAS_METRICS.names)
