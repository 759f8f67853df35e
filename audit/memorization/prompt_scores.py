"""Memorization without a training set: flag the prompts whose generation shows Wen et al.'s signature.

Wen, Liu, Chen, Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models" (ICLR 2024):
when a prompt makes a model reproduce a training image, the text-conditional noise prediction
``|| eps(x_t, prompt) - eps(x_t, empty) ||_2`` is abnormally large from the first denoising step. The
generation stage records it per image (``generations.mem_score_*``); this module turns it into a
per-prompt score (the mean over the prompt's images, as Wen et al. average over generations), a flag
against a threshold, a ranking, and, when the run holds both ``memorized_sd1`` and ``ordinary_sd1``
prompts, the detector's AUC on them. With an index check in the run (``memorization/matches``) it also says
whether a flagged prompt's images were confirmed as copies.

A flag is evidence, not proof: confirm it against an index of the training data. The published accuracy
(AUC about 0.96 on SD 1.x; 0.962 and 79% of memorized prompts caught at 1% false positives in an
independent re-measurement at step 1) is a property of SD 1.x weights; on the tiny model the score proves
the plumbing only.

Writes ``memorization/prompt_scores.parquet`` and the ``memorization_scores`` stage in ``run.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from audit.memorization.verdicts import HITS
from diffaudit.errors import ConfigError, InputError
from diffaudit.runs import Run, atomic_write_text

# Chen, Liu, Shah, Xu (CVPR 2025, "Enhancing Privacy-Utility Trade-offs to Mitigate Memorization in
# Diffusion Models"), building on Wen et al.'s code and setting (SD v1.4, 512x512, DDIM, CFG 7.5, one image
# per prompt), treat a prompt whose step-1 magnitude exceeds 5 as memorized (their ``mag_thres_pr``). Wen et
# al. themselves report AUC and true-positive rates, not a threshold. It is a documented starting point for
# SD 1.x at 512x512, not a calibrated operating point: calibrate on prompts known to be ordinary.
DEFAULT_THRESHOLD = 5.0
DEFAULT_STATISTIC = "step1"
REFERENCE_LATENT = (4, 64, 64)  # SD 1.x at 512x512: the setting the default comes from
STATISTICS = {"step1": "mem_score_step1", "mean": "mem_score_mean"}
POSITIVE_SUITES = frozenset({"memorized_sd1"})   # prompts known to be memorized by SD 1.x
NEGATIVE_SUITES = frozenset({"ordinary_sd1"})    # prompts assumed ordinary
COPY_VERDICTS = tuple(sorted(HITS))  # what counts as a memorization hit is defined once (verdicts.HITS)
TOP = 10
BOOTSTRAP = 2000
TABLE = "memorization/prompt_scores"


@dataclass(frozen=True)
class Threshold:
    """A flagging threshold and where it comes from (printed and recorded with every result)."""

    value: float
    statistic: str
    source: str  # default | option | calibration
    note: str


def default_threshold(latent_shape: list[int] | tuple[int, ...] | None, statistic: str = DEFAULT_STATISTIC) -> Threshold:
    """The SD 1.x setting's threshold; for another latent size scaled by sqrt(elements / 16,384) (a norm over
    more elements is larger by that factor when each element's magnitude is the same), and said so."""
    if statistic != "step1":
        raise ConfigError(f"no published threshold for the {statistic!r} statistic; pass --threshold or a "
                          "calibration file (`diffaudit audit memorization-calibrate`)")
    ref = math.prod(REFERENCE_LATENT)
    n = math.prod(latent_shape) if latent_shape else ref
    if n == ref:
        return Threshold(DEFAULT_THRESHOLD, statistic, "default",
                         "the SD 1.x setting at 512x512 (Chen et al. 2025, after Wen et al. 2024); valid for SD 1.x "
                         "weights at that size, uncalibrated for any other model")
    value = DEFAULT_THRESHOLD * math.sqrt(n / ref)
    return Threshold(value, statistic, "default",
                     f"the SD 1.x setting ({DEFAULT_THRESHOLD} for a 4x64x64 latent) scaled by sqrt({n}/{ref}) for "
                     f"this run's {'x'.join(map(str, latent_shape))} latent: uncalibrated, calibrate it on this model")


def resolve_threshold(value: str | float | None, run: Run, statistic: str | None = None) -> Threshold:
    """``None``: the default; a number; or a calibration file written by ``calibrate``."""
    latent = (run.info.get("generation") or {}).get("memorization_score", {}).get("latent_shape")
    if value is None:
        return default_threshold(latent, statistic or DEFAULT_STATISTIC)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is not None:
        if not math.isfinite(number) or number < 0:
            raise ConfigError(f"--threshold {value!r}: give a non-negative number or a calibration file")
        return Threshold(number, statistic or DEFAULT_STATISTIC, "option", "given on the command line")
    path = Path(value)
    try:
        cal = json.loads(path.read_text())
        cal_value, cal_stat = float(cal["threshold"]), str(cal["statistic"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--threshold {value!r} is neither a number nor a calibration file "
                          f"(`diffaudit audit memorization-calibrate --out FILE`): {e}") from None
    if statistic is not None and statistic != cal_stat:
        raise ConfigError(f"{path} was calibrated for the {cal_stat!r} statistic, not {statistic!r}")
    gen = run.info.get("generation") or {}
    same = {k: (cal.get(k), gen.get(k)) for k in ("model", "model_revision", "steps", "scheduler")}
    differ = [f"{k} {a!r} there, {b!r} here" for k, (a, b) in same.items() if a != b]
    if cal.get("latent_shape") and latent and list(cal["latent_shape"]) != list(latent):
        differ.append(f"latent {cal['latent_shape']} there, {latent} here")
    fpr = cal.get("fpr_heldout")
    note = (f"calibrated on {cal.get('prompts_calibration')} ordinary prompts of run {cal.get('run')!r}; "
            f"false-positive rate on {cal.get('prompts_heldout')} held-out ones: "
            + ("n/a" if fpr is None else f"{fpr:.3f} (95% CI {cal['fpr_heldout_ci'][0]:.3f}-{cal['fpr_heldout_ci'][1]:.3f})"))
    if differ:
        note += "; calibrated with other settings (" + "; ".join(differ) + "): it may not transfer"
    return Threshold(cal_value, cal_stat, "calibration", note)


# --- per-prompt scores -------------------------------------------------------------------------------------

def prompt_scores(gens: pd.DataFrame, threshold: Threshold, copies: dict[str, bool] | None = None) -> pd.DataFrame:
    """One row per prompt: its images' score distribution, the prompt score (their mean), the flag, the rank
    (1 = most suspicious) and, where an index check covers the prompt, whether a copy was confirmed."""
    col = STATISTICS[threshold.statistic]
    rows = []
    for prompt_id, g in gens.groupby("prompt_id", sort=True):
        v = pd.to_numeric(g[col], errors="coerce").dropna().to_numpy(dtype=float)
        first = g.iloc[0]
        scored = len(v) > 0
        rows.append({
            "prompt_id": prompt_id, "suite": first.get("suite"), "subject": first.get("subject"),
            "prompt": first.get("prompt"), "mode": first.get("mode"), "images": len(g), "scored": len(v),
            "score": float(v.mean()) if scored else None, "score_median": float(np.median(v)) if scored else None,
            "score_min": float(v.min()) if scored else None, "score_max": float(v.max()) if scored else None,
            "images_above": int((v > threshold.value).sum()), "threshold": float(threshold.value),
            "flagged": bool(v.mean() > threshold.value) if scored else None, "rank": None,
            "copy_found": None if copies is None or prompt_id not in copies else bool(copies[prompt_id])})
    table = pd.DataFrame(rows)
    if len(table):
        order = table["score"].rank(ascending=False, method="first")
        table["rank"] = [None if pd.isna(r) else int(r) for r in order]
        table = table.sort_values(["rank", "prompt_id"], na_position="last").reset_index(drop=True)
    return table


def copies_from_index(run: Run) -> dict[str, bool] | None:
    """Per prompt checked against an index: whether any of its images was confirmed a near-copy; None when
    the run has no index check. Prompts the check did not cover (``memorization/rates``) are left out."""
    if not run.has_table("memorization/matches"):
        return None
    matches = run.read_table("memorization/matches")
    confirmed = set(matches.loc[matches["verdict"].isin(COPY_VERDICTS), "prompt_id"])
    if run.has_table("memorization/rates"):
        checked = set(run.read_table("memorization/rates")["prompt_id"])
    else:
        checked = set(run.read_table("generations")["prompt_id"])
    return {p: p in confirmed for p in checked}


def detector_auc(table: pd.DataFrame, *, seed: int = 0) -> dict[str, Any] | None:
    """AUC of the prompt score between known-memorized and ordinary prompts (None unless the run holds both),
    with a percentile bootstrap interval over prompts, and the true-positive rate at 1% false positives."""
    scored = table[table["score"].notna()]
    pos = scored.loc[scored["suite"].isin(POSITIVE_SUITES), "score"].to_numpy(float)
    neg = scored.loc[scored["suite"].isin(NEGATIVE_SUITES), "score"].to_numpy(float)
    if not len(pos) or not len(neg):
        return None
    rng = np.random.default_rng(seed)
    boots = [_auc(rng.choice(pos, len(pos)), rng.choice(neg, len(neg))) for _ in range(BOOTSTRAP)]
    cut = float(np.quantile(neg, 0.99, method="higher"))
    thr = float(table["threshold"].iloc[0])
    return {"auc": round(_auc(pos, neg), 4), "auc_ci": [round(float(np.percentile(boots, q)), 4) for q in (2.5, 97.5)],
            "tpr_at_1pct_fpr": round(float((pos > cut).mean()), 4), "memorized_prompts": len(pos),
            "ordinary_prompts": len(neg), "tpr_at_threshold": round(float((pos > thr).mean()), 4),
            "fpr_at_threshold": round(float((neg > thr).mean()), 4),
            "note": "1% false positives needs >= 100 ordinary prompts to mean anything" if len(neg) < 100 else None}


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a memorized prompt > score of an ordinary one), ties counted half (Mann-Whitney U / n1 n2)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def _no_score_reason(run: Run, gens: pd.DataFrame) -> str:
    gen = run.info.get("generation") or {}
    if "memorization_score" not in gen:
        return "it was generated before diffaudit recorded memorization scores, or imported"
    if gen.get("guidance") is not None and float(gen["guidance"]) <= 1:
        return f"it was generated without classifier-free guidance (guidance {gen['guidance']})"
    if len(gens) and gens["negative_prompt"].fillna("").astype(bool).all():
        return "every prompt has a negative prompt (the score needs the empty prompt's prediction)"
    return "no image has a score"


def score_run(run_dir: str | Path, *, threshold: str | float | None = None, statistic: str | None = None) -> dict[str, Any]:
    """Score a run's prompts from the recorded per-image scores; write ``memorization/prompt_scores``; return
    a summary (the most suspicious prompts, the flag count, the AUC where the run holds both suites). A run
    without any score writes nothing and says why (``summary["scored_images"] == 0``)."""
    t0 = time.perf_counter()
    if statistic is not None and statistic not in STATISTICS:
        raise ConfigError(f"--statistic {statistic!r}: choose from {', '.join(STATISTICS)}")
    run = Run.open(run_dir)
    gens = run.read_table("generations")
    if gens.empty:
        raise InputError(f"run {run.root} has no images; generate into it first")
    thr = resolve_threshold(threshold, run, statistic)
    scored = int(gens[STATISTICS[thr.statistic]].notna().sum())
    summary: dict[str, Any] = {"run": str(run.root), "images": len(gens), "scored_images": scored,
                               "prompts": int(gens["prompt_id"].nunique()), "statistic": thr.statistic,
                               "threshold": asdict(thr)}
    if not scored:
        summary["reason"] = f"no memorization scores in this run: {_no_score_reason(run, gens)}"
        return summary
    copies = copies_from_index(run)
    table = prompt_scores(gens, thr, copies)
    flagged = table[table["flagged"].fillna(False).astype(bool)]
    auc = detector_auc(table)
    top = table.head(TOP)
    summary.update(
        flagged_prompts=len(flagged), scored_prompts=int(table["score"].notna().sum()),
        unscored_images=len(gens) - scored,
        most_suspicious=[{"prompt_id": r.prompt_id, "score": round(r.score, 4), "images": int(r.images),
                          "flagged": bool(r.flagged), "copy_found": None if pd.isna(r.copy_found) else bool(r.copy_found),
                          "prompt": r.prompt} for r in top.itertuples() if r.score is not None and not pd.isna(r.score)],
        index_check=None if copies is None else {
            "flagged_with_copy": int(flagged["copy_found"].eq(True).sum()),
            "flagged_without_copy": int(flagged["copy_found"].eq(False).sum()),
            "flagged_not_checked": int(flagged["copy_found"].isna().sum())},
        auc=auc,
        meaning="a flag is evidence, not proof: a high score means the prompt pulls the model strongly towards "
                "one image, as memorized prompts do; confirm a flag against an index of the training data "
                "(`--index`)")
    if str((run.info.get("generation") or {}).get("model")) == "tiny":
        summary["caution"] = "the tiny model has random weights: these scores prove the plumbing, not memorization"
    with run.lock():
        run.write_table(TABLE, table)
        run.record_stage("memorization_scores", seconds=round(time.perf_counter() - t0, 3), statistic=thr.statistic,
                         threshold=thr.value, threshold_source=thr.source, threshold_note=thr.note,
                         scored_images=scored, flagged_prompts=len(flagged), auc=auc)
    return summary


# --- calibration ---------------------------------------------------------------------------------------------

def _half(prompt_id: str, seed: int) -> str:
    digest = hashlib.sha256(f"{seed}/{prompt_id}".encode()).digest()
    return "calibration" if digest[0] % 2 == 0 else "heldout"


def calibrate(run_dir: str | Path, *, fpr: float = 0.01, statistic: str = DEFAULT_STATISTIC, suite: str | None = None,
              seed: int = 0, out: str | Path | None = None) -> dict[str, Any]:
    """Fit a threshold on a run of prompts known to be ordinary: the (1 - fpr) quantile of the prompt scores of
    one half of the prompts (split by a hash of the prompt id), and the false-positive rate it implies
    measured on the other half, with a 95% Wilson interval. A run that also holds known-memorized prompts
    is calibrated on its ``ordinary_sd1`` prompts only, unless ``suite`` says otherwise."""
    from statsmodels.stats.proportion import proportion_confint

    if not 0 < fpr < 1:
        raise ConfigError(f"--fpr {fpr}: give a rate between 0 and 1, e.g. 0.01")
    if statistic not in STATISTICS:
        raise ConfigError(f"--statistic {statistic!r}: choose from {', '.join(STATISTICS)}")
    run = Run.open(run_dir)
    gens = run.read_table("generations")
    if suite is None and gens["suite"].isin(POSITIVE_SUITES).any():
        suite = next(iter(NEGATIVE_SUITES))
    if suite is not None:
        gens = gens[gens["suite"] == suite]
        if gens.empty:
            raise InputError(f"run {run.root} has no images of suite {suite!r}")
    placeholder = Threshold(math.inf, statistic, "calibration", "")
    table = prompt_scores(gens, placeholder)
    table = table[table["score"].notna()]
    if table.empty:
        raise InputError(f"run {run.root} has no memorization scores to calibrate on: {_no_score_reason(run, gens)}")
    halves = table["prompt_id"].map(lambda p: _half(p, seed))
    cal, held = table.loc[halves == "calibration", "score"].to_numpy(float), table.loc[halves == "heldout", "score"]
    need = math.ceil(1 / fpr)
    if len(cal) < need or len(held) < need:
        raise InputError(f"{len(table)} ordinary prompts are too few for a {fpr:g} false-positive rate: each half "
                         f"needs at least {need} (give more prompts or a larger --fpr)")
    value = float(np.quantile(cal, 1 - fpr, method="higher"))
    k = int((held.to_numpy(float) > value).sum())
    lo, hi = proportion_confint(k, len(held), method="wilson")
    gen = run.info.get("generation") or {}
    result = {"threshold": value, "statistic": statistic, "fpr_target": fpr, "fpr_heldout": k / len(held),
              "fpr_heldout_ci": [float(lo), float(hi)], "prompts_calibration": len(cal),
              "prompts_heldout": int(len(held)), "suite": suite, "run": str(run.root), "seed": seed,
              **{k_: gen.get(k_) for k_ in ("model", "model_revision", "steps", "scheduler", "guidance", "width",
                                            "height")},
              "latent_shape": (gen.get("memorization_score") or {}).get("latent_shape"),
              "meaning": "flagging prompts whose score exceeds this threshold flags about fpr_heldout of ordinary "
                         "prompts of this kind, with this model and these settings"}
    if out is not None:
        atomic_write_text(Path(out), json.dumps(result, indent=2) + "\n")
        result["written"] = str(out)
    return result
