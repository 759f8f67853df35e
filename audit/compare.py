"""A run against a reference run: how a model's perceived-attribute shares differ from real images'.

OpenBias (D'Incà et al., CVPR 2024) measures a bias on real images of the same classes (its "original
images" mode) beside the generated ones, to tell what the model adds from what the data already holds.
Here both runs are probed alike (``diffaudit audit bias``); :func:`versus` sets their ``bias/summary``
tables side by side, per (probe, attribute, subject, template, label): both shares with their 95% Wilson
intervals, the difference with Newcombe's hybrid score interval (method 10 of Newcombe 1998, built from the
two Wilson intervals), Fisher's exact test and Benjamini-Hochberg q-values across subjects. The report and
the dashboard's Compare page both read it; :func:`compare_runs` writes it into the run as
``compare/reference``.

Shares from different probe versions (another CLIP model, other thresholds) are not compared: their
difference would mix the classifiers' disagreement into the data's.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pandas as pd

from diffaudit.errors import InputError
from diffaudit.runs import Run, sha256_file

KEYS = ["probe", "attribute", "subject", "template", "label"]
_SIDE = ["count", "n", "share", "ci_low", "ci_high"]


def _wilson(k: np.ndarray, n: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = np.full(len(k), np.nan), np.full(len(k), np.nan)
    ok = n > 0
    if ok.any():
        lo[ok], hi[ok] = proportion_confint(k[ok], n[ok], alpha=alpha, method="wilson")
    return lo, hi


def versus(run: pd.DataFrame, reference: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """Two BIAS_SUMMARY tables -> one row per (probe, attribute, subject, template, label) present in both.

    Columns: the keys; ``count, n, share, ci_low, ci_high`` of ``run``; the same prefixed ``reference_`` of
    ``reference``; ``delta`` = share - reference_share with ``delta_ci_low/high`` (Newcombe hybrid score,
    from Wilson intervals recomputed at ``alpha`` whatever interval the summaries used); ``p_value``
    (Fisher's exact test of the two counts) and ``q_value`` (Benjamini-Hochberg within each probe, attribute,
    template and label, across subjects). Rows where either side has no non-abstained image keep null
    shares and tests. Sorted by |delta|, largest first.
    """
    from scipy.stats import fisher_exact
    from statsmodels.stats.multitest import multipletests

    a = run.loc[run["label"].notna(), KEYS + _SIDE]
    b = reference.loc[reference["label"].notna(), KEYS + _SIDE].rename(columns={c: f"reference_{c}" for c in _SIDE})
    both = a.merge(b, on=KEYS, how="inner")
    k1, n1 = both["count"].to_numpy(float), both["n"].to_numpy(float)
    k2, n2 = both["reference_count"].to_numpy(float), both["reference_n"].to_numpy(float)
    l1, u1 = _wilson(k1, n1, alpha)
    l2, u2 = _wilson(k2, n2, alpha)
    with np.errstate(invalid="ignore", divide="ignore"):
        p1, p2 = np.where(n1 > 0, k1 / n1, np.nan), np.where(n2 > 0, k2 / n2, np.nan)
    d = p1 - p2
    both["delta"] = d
    both["delta_ci_low"] = d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    both["delta_ci_high"] = d + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    tested = (n1 > 0) & (n2 > 0)
    p = np.full(len(both), np.nan)
    cache: dict[tuple[int, int, int, int], float] = {}
    for i in np.flatnonzero(tested):
        key = (int(k1[i]), int(n1[i] - k1[i]), int(k2[i]), int(n2[i] - k2[i]))
        if key not in cache:
            cache[key] = float(fisher_exact([[key[0], key[1]], [key[2], key[3]]]).pvalue)
        p[i] = cache[key]
    both["p_value"] = p
    q = np.full(len(both), np.nan)
    for _, idx in both[tested].groupby(["probe", "attribute", "template", "label"], sort=False).indices.items():
        rows = np.flatnonzero(tested)[idx]
        q[rows] = multipletests(p[rows], method="fdr_bh")[1]
    both["q_value"] = q
    for c in ("count", "n", "reference_count", "reference_n"):
        both[c] = both[c].astype("int64")
    return both.sort_values("delta", key=lambda s: s.abs(), ascending=False, na_position="last",
                            kind="stable").reset_index(drop=True)


def probe_versions(run: Run) -> dict[str, set[str]]:
    """probe name -> the probe versions its table holds."""
    out = {}
    for t in run.tables():
        if t.startswith("probes/"):
            out[t.split("/", 1)[1]] = set(run.read_table(t)["probe_version"].dropna())
    return out


def compare_runs(run_dir: str | os.PathLike | Run, reference_dir: str | os.PathLike | Run, *,
                 alpha: float = 0.05) -> dict[str, Any]:
    """Write ``compare/reference`` into ``run_dir``: its bias summary against ``reference_dir``'s (see
    :func:`versus`), for the probes both ran with the same version. Returns a summary."""
    t0 = time.perf_counter()
    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)
    ref = reference_dir if isinstance(reference_dir, Run) else Run.open(reference_dir)
    if run.root == ref.root:
        raise InputError(f"{run.root} is the reference itself; compare another run against it")
    for r in (run, ref):
        if not r.has_table("bias/summary"):
            raise InputError(f"run {r.root} has no bias summary; run `diffaudit audit bias {r.root}` first")
    a, b = run.read_table("bias/summary"), ref.read_table("bias/summary")
    va, vb = probe_versions(run), probe_versions(ref)
    common = sorted(set(a["probe"]) & set(b["probe"]))
    same = [p for p in common if va.get(p) == vb.get(p)]
    notes = [f"probe {p!r} ran as {sorted(va.get(p, []))} here and {sorted(vb.get(p, []))} on the reference: "
             "not compared (rerun the bias audit of one with the other's settings)" for p in common if p not in same]
    if not same:
        raise InputError(f"{run.name} and {ref.name} have no probe run with the same version"
                         + (f" ({notes[0]})" if notes else f": probes {sorted(set(a['probe']))} vs {sorted(set(b['probe']))}"))
    table = versus(a[a["probe"].isin(same)], b[b["probe"].isin(same)], alpha=alpha)
    if table.empty:
        raise InputError(f"{run.name} and {ref.name} share no (subject, template, label): compare runs of one suite")
    table["reference_run"] = ref.name
    with run.lock():
        path = run.write_table("compare/reference", table)
        pooled = table[table["template"] == "all"]
        significant = int((pooled["q_value"] < 0.05).sum())
        seconds = time.perf_counter() - t0
        run.record_stage("compare", seconds=seconds, reference=str(ref.root), reference_run=ref.name,
                         reference_kind=(ref.info.get("generation") or {}).get("kind"), probes=same, notes=notes,
                         summary_sha256=sha256_file(run.table_path("bias/summary")),
                         reference_summary_sha256=sha256_file(ref.table_path("bias/summary")))
    return {"run": str(run.root), "reference": str(ref.root), "rows": len(table), "significant": significant,
            "probes": same, "notes": notes, "table": str(path), "seconds": round(seconds, 3)}
