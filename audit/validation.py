"""Probe validation on a user's labelled images, and shares corrected for misclassification.

A probe is a classifier with errors. Given images a person has labelled (``labels.csv``: ``image_id`` or
``path``, and ``label``), :func:`validate_probe` gives per-class sensitivity and specificity (one class
against the rest) with Wilson intervals, using the same one-vote-per-image rule as the summary
(:func:`audit.stats.pick`). Abstentions are reported per true class and left out of both rates.

:func:`rogan_gladen` corrects an observed share for a two-class probe (Rogan and Gladen 1978):
``(share + specificity - 1) / (sensitivity + specificity - 1)``, clipped to [0, 1], with a simulation
interval over the three binomials (the audit images, the labelled positives, the labelled negatives), so
it carries both the sampling and the validation uncertainty. Each proportion is drawn from its Jeffreys
Beta(k + 1/2, n - k + 1/2) distribution rather than resampled binomially, so a share of 0/n or n/n
still gets a non-degenerate interval. It assumes the probe errs at the same rates on the audited images
as on the labelled ones: label a random sample of the run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from diffaudit.errors import InputError


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """Read a labels CSV with columns ``label`` and ``image_id`` or ``path``; every row needs a label."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"labels file {p} does not exist")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"labels file {p} is not a readable CSV: {e}") from None
    df.columns = [str(c).strip() for c in df.columns]
    key = "image_id" if "image_id" in df.columns else "path" if "path" in df.columns else None
    if key is None or "label" not in df.columns:
        raise InputError(f"labels file {p} needs a 'label' column and an 'image_id' or 'path' column; "
                         f"it has {list(df.columns)}")
    df = df[[key, "label"]].apply(lambda s: s.str.strip())
    empty = np.flatnonzero((df["label"] == "") | (df[key] == ""))
    if len(empty):
        raise InputError(f"labels file {p}: row {int(empty[0]) + 2} has an empty {key} or label")
    if df[key].duplicated().any():
        raise InputError(f"labels file {p}: {df[key][df[key].duplicated()].iloc[0]!r} is labelled twice")
    return df


def _to_image_ids(labels: pd.DataFrame, generations: pd.DataFrame | None, run_root: Path | None) -> pd.DataFrame:
    """Labels keyed by image_id (a ``path`` column is matched against the generations' relative paths)."""
    if "image_id" in labels.columns:
        return labels[["image_id", "label"]]
    if generations is None:
        raise InputError("labels given by path need the run's generations table to find their image_id")
    by_path = dict(zip(generations["path"], generations["image_id"], strict=True))
    ids = []
    for raw in labels["path"]:
        p = Path(raw)
        if p.is_absolute() and run_root is not None and p.resolve().is_relative_to(run_root.resolve()):
            p = p.resolve().relative_to(run_root.resolve())
        ids.append(by_path.get(PurePosixPath(p.as_posix()).as_posix()))
    missing = [raw for raw, i in zip(labels["path"], ids, strict=True) if i is None]
    if missing:
        raise InputError(f"{len(missing)} labelled path(s) are not images of this run (e.g. {missing[0]!r}); "
                         "give paths relative to the run folder, as in generations.parquet")
    return pd.DataFrame({"image_id": ids, "label": labels["label"].to_numpy()})


def validate_probe(labels: pd.DataFrame | str | os.PathLike, probe_table: pd.DataFrame, *, attribute: str,
                   classes: Sequence[str] | None = None, generations: pd.DataFrame | None = None,
                   run_root: str | os.PathLike | None = None, alpha: float = 0.05) -> pd.DataFrame:
    """Per-class sensitivity and specificity of a probe on labelled images, with Wilson intervals.

    ``probe_table`` is a PROBES table (one probe); ``classes`` are the labels the probe can give for
    ``attribute`` (default: those it gave in ``probe_table``). A label outside ``classes`` is an
    ``InputError`` naming it. Returns one row per class: class, positives (labelled images of that class
    with a vote), tp, fn, fp, tn, sensitivity, sensitivity_ci_low/high, specificity,
    specificity_ci_low/high, abstained (labelled images of that class the probe abstained on),
    abstention_rate.
    """
    from statsmodels.stats.proportion import proportion_confint

    from audit.stats import pick

    truth = read_labels(labels) if isinstance(labels, str | os.PathLike) else labels
    truth = _to_image_ids(truth, generations, Path(run_root) if run_root is not None else None)
    votes = pick(probe_table)
    votes = votes[votes["attribute"] == attribute]
    if votes.empty:
        raise InputError(f"the probe table has no {attribute!r} rows; attributes: "
                         f"{', '.join(sorted(set(probe_table['attribute'])))}")
    known = sorted(set(classes) if classes is not None else set(votes["label"].dropna()))
    unknown = sorted(set(truth["label"]) - set(known))
    if unknown:
        raise InputError(f"labels file has unknown class(es) {unknown}; the probe's classes for "
                         f"{attribute} are: {', '.join(known)}")
    joined = truth.merge(votes[["image_id", "label", "abstained"]].rename(columns={"label": "predicted"}),
                         on="image_id", how="left")
    if joined["abstained"].isna().any():
        missing = joined.loc[joined["abstained"].isna(), "image_id"]
        raise InputError(f"{len(missing)} labelled image(s) have no {attribute} prediction (e.g. "
                         f"{missing.iloc[0]!r}); run the probe on them first")
    abstained = joined["abstained"].astype(bool).to_numpy()
    voted = joined[~abstained]
    rows = []
    for c in known:
        pos = (voted["label"] == c).to_numpy()
        hit = (voted["predicted"] == c).to_numpy()
        tp, fn = int((pos & hit).sum()), int((pos & ~hit).sum())
        fp, tn = int((~pos & hit).sum()), int((~pos & ~hit).sum())
        row = dict(**{"class": c}, positives=tp + fn, tp=tp, fn=fn, fp=fp, tn=tn)
        for name, k, n in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp)):
            lo, hi = proportion_confint(k, n, alpha=alpha, method="wilson") if n else (np.nan, np.nan)
            row |= {name: k / n if n else np.nan, f"{name}_ci_low": lo, f"{name}_ci_high": hi}
        n_abst = int((abstained & (joined["label"] == c).to_numpy()).sum())
        row |= {"abstained": n_abst, "abstention_rate": n_abst / max(int((joined["label"] == c).sum()), 1)}
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Corrected:
    """A share corrected for misclassification, with its bootstrap interval."""

    estimate: float
    ci_low: float
    ci_high: float


def rogan_gladen(share: float, sensitivity: float, specificity: float, *, n: int, positives: int,
                 negatives: int, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> Corrected:
    """The Rogan-Gladen corrected share with a simulation interval over three binomials: ``share`` from
    ``n`` audited images, ``sensitivity`` from ``positives`` labelled positives and ``specificity`` from
    ``negatives`` labelled negatives, each drawn from its Jeffreys Beta. Draws where the simulated probe is
    no better than chance (sensitivity + specificity <= 1) are left out of the interval."""
    if np.isnan(sensitivity) or np.isnan(specificity):
        raise InputError("sensitivity or specificity is not estimable (no labelled images of a class): "
                         "its shares cannot be corrected")
    youden = sensitivity + specificity - 1
    if youden <= 0:
        raise InputError(f"the probe is no better than chance (sensitivity {sensitivity:.3f} + specificity "
                         f"{specificity:.3f} <= 1): its shares cannot be corrected")
    if min(n, positives, negatives) < 1:
        raise InputError(f"needs audited images and labelled positives and negatives with a vote (has n={n}, "
                         f"positives={positives}, negatives={negatives})")
    estimate = float(np.clip((share + specificity - 1) / youden, 0, 1))
    rng = np.random.default_rng(seed)

    def draw(p: float, m: int) -> np.ndarray:
        return rng.beta(p * m + 0.5, (1 - p) * m + 0.5, n_boot)

    s, se, sp = draw(share, n), draw(sensitivity, positives), draw(specificity, negatives)
    j = se + sp - 1
    ok = j > 0
    boot = np.clip((s[ok] + sp[ok] - 1) / j[ok], 0, 1)
    lo, hi = np.percentile(boot, [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100])
    return Corrected(estimate, float(lo), float(hi))


def correct_summary(summary: pd.DataFrame, validation: pd.DataFrame, *, probe: str, attribute: str,
                    confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Rogan-Gladen corrected shares for the summary rows of one two-class (probe, attribute).

    Returns the summary rows with corrected_share, corrected_ci_low, corrected_ci_high and corrected_note
    added. With two classes, class c's sensitivity/specificity are the other class's
    specificity/sensitivity, so the corrected shares of the two labels still sum to one. A class whose
    rates are not estimable (no labelled image of a class with a vote, or a probe no better than chance)
    is not corrected: NaN, with the reason in corrected_note.
    """
    rows = summary[(summary["probe"] == probe) & (summary["attribute"] == attribute)
                   & summary["label"].notna() & (summary["n"] > 0)].copy()
    classes = set(validation["class"])
    if len(classes) != 2 or not set(rows["label"]) <= classes:
        raise InputError(f"Rogan-Gladen correction needs a two-class attribute validated on the same classes; "
                         f"validation has {sorted(classes)}, the summary {sorted(set(rows['label']))}")
    v = validation.set_index("class")
    out, notes = [], []
    for share, n, label in zip(rows["share"], rows["n"], rows["label"], strict=True):
        c = v.loc[label]
        try:
            r = rogan_gladen(float(share), float(c["sensitivity"]), float(c["specificity"]), n=int(n),
                             positives=int(c["tp"] + c["fn"]), negatives=int(c["tn"] + c["fp"]),
                             confidence=confidence, n_boot=n_boot, seed=seed)
        except InputError as e:
            out.append((np.nan, np.nan, np.nan))
            notes.append(f"{label}: {e}")
            continue
        out.append((r.estimate, r.ci_low, r.ci_high))
        notes.append(None)
    rows[["corrected_share", "corrected_ci_low", "corrected_ci_high"]] = (
        np.array(out) if out else np.empty((0, 3)))
    rows["corrected_note"] = pd.Series(notes, index=rows.index, dtype=object)
    return rows.reset_index(drop=True)
