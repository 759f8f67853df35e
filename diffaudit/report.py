"""The audit report: ``report.md`` and a self-contained ``report.html`` built only from the run's tables.

It recomputes nothing: it reads what the stages wrote (``bias/summary``, ``bias/metrics``, the probe
tables, ``memorization/*``, ``provenance/*``) and lays it out. Charts are inline SVG and evidence images
are embedded as data URIs, so the HTML opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from diffaudit import __version__
from diffaudit.errors import DiffauditError
from diffaudit.runs import Run, atomic_write_text

CAVEAT = (
    "Attribute labels are *perceived* presentation inferred by classifiers from pixels (perceived gender, "
    "perceived age group, skin tone on the Monk scale). They are never a person's identity, and the "
    "classifiers have their own errors: read shares with their intervals, and validate a probe on labelled "
    "images (`diffaudit probe validate`) before drawing conclusions."
)
TOP_N = 5


@dataclass
class Doc:
    """A list of blocks rendered both as Markdown and as HTML, so the two reports always agree."""

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def svg(self, svg: str, alt: str) -> None:
        self.blocks.append(("svg", svg, alt))

    def images(self, pairs: list[tuple[str, bytes]]) -> None:
        self.blocks.append(("images", pairs))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                out.append(_md_table(b[1]))
            elif b[0] == "svg":
                out.append(f"*(chart in report.html: {b[2]})*")
            elif b[0] == "images":
                out.append("*(evidence images in report.html: " + ", ".join(c for c, _ in b[1]) + ")*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "table" and b[1].empty:
                body.append("<p><i>(none)</i></p>")
            elif b[0] == "table":
                body.append(b[1].to_html(index=False, escape=True, border=0, classes="t", na_rep="–"))
            elif b[0] == "svg":
                body.append(f'<figure role="img" aria-label="{html.escape(b[2])}">{b[1]}</figure>')
            elif b[0] == "images":
                cells = "".join(
                    f'<figure><img src="data:image/png;base64,{base64.b64encode(data).decode()}" '
                    f'alt="{html.escape(cap)}"><figcaption>{html.escape(cap)}</figcaption></figure>'
                    for cap, data in b[1])
                body.append(f'<div class="pairs">{cells}</div>')
        return (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


_CSS = """
body{font:15px/1.5 system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table.t{border-collapse:collapse;margin:1em 0;font-size:13px}
table.t th,table.t td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}
.pairs{display:flex;flex-wrap:wrap;gap:12px}.pairs figure{margin:0;text-align:center;font-size:12px}
.pairs img{width:160px;height:160px;object-fit:contain;border:1px solid #ccc;image-rendering:pixelated}
code{background:#f3f3f3;padding:0 3px}
"""


def _inline(text: str) -> str:
    """Escape, then render the little Markdown we use in paragraphs: `code` and *emphasis*."""
    import re

    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)
    return re.sub(r"\*([^*]+)\*", r"<i>\1</i>", t)


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "*(none)*"
    cols = [str(c) for c in df.columns]
    rows = [["–" if (isinstance(v, float) and math.isnan(v)) or v is None else str(v) for v in r]
            for r in df.itertuples(index=False)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "–" if x is None or pd.isna(x) else f"{100 * x:.0f}%"


def _interval(lo: float | None, hi: float | None) -> str:
    return "–" if lo is None or pd.isna(lo) else f"[{100 * lo:.0f}, {100 * hi:.0f}]"


def interval_chart(rows: pd.DataFrame, label: str, reference: str = "BLS 2022 share") -> str:
    """Inline SVG: per row a Wilson interval, the run's share (dot) and the reference share (diamond)."""
    width, left, row_h = 720, 220, 22
    height = 40 + row_h * len(rows)
    x = lambda v: left + (width - left - 20) * float(v)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="12">']
    for t in (0, 0.25, 0.5, 0.75, 1):
        parts.append(f'<line x1="{x(t)}" y1="20" x2="{x(t)}" y2="{height - 10}" stroke="#ddd"/>'
                     f'<text x="{x(t)}" y="14" text-anchor="middle">{int(t * 100)}%</text>')
    for i, r in enumerate(rows.itertuples(index=False)):
        y = 30 + i * row_h
        parts.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end">{html.escape(str(r.subject))}</text>')
        parts.append(f'<line x1="{x(r.ci_low)}" y1="{y}" x2="{x(r.ci_high)}" y2="{y}" stroke="#1f77b4" '
                     'stroke-width="3"/>')
        parts.append(f'<circle cx="{x(r.share)}" cy="{y}" r="4" fill="#1f77b4"/>')
        if r.reference_share is not None and not pd.isna(r.reference_share):
            cx = x(r.reference_share)
            parts.append(f'<path d="M{cx} {y - 6} L{cx + 6} {y} L{cx} {y + 6} L{cx - 6} {y} Z" fill="#d62728"/>')
    parts.append(f'<text x="{left}" y="{height - 1}" fill="#555">blue: share perceived as {html.escape(label)} '
                 f'with 95% Wilson interval; red diamond: {html.escape(reference)}</text></svg>')
    return "".join(parts)


def build_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.html into the run from its tables; return both paths."""
    run = Run.open(run_dir)
    info = run.info
    doc = Doc()
    gen_cfg = info.get("generation", {})
    gens = run.read_table("generations")
    doc.h(1, f"diffaudit report: {run.name}")
    doc.p(f"Generated by diffaudit {__version__}. Run created {info.get('created', '?')}.")
    _what_was_audited(doc, info, gen_cfg, gens, run)
    _bias(doc, run)
    _memorization(doc, run)
    _memorization_scores(doc, run)
    _provenance(doc, run)
    doc.h(2, "Limitations")
    doc.p(CAVEAT)
    if str(gen_cfg.get("model", "")) == "tiny":
        doc.p("**This run used the built-in tiny model, whose random weights draw noise.** Its figures "
              "demonstrate the pipeline, not a model's behaviour. Real audits need real weights: see the README.")
    md_path, html_path = run.root / "report.md", run.root / "report.html"
    with run.lock():
        atomic_write_text(md_path, doc.markdown())
        atomic_write_text(html_path, doc.html(f"diffaudit report: {run.name}"))
    return md_path, html_path


def _what_was_audited(doc: Doc, info: dict, gen_cfg: dict, gens: pd.DataFrame, run: Run) -> None:
    doc.h(2, "What was audited")
    facts = {
        "model": gen_cfg.get("model", "–"),
        "model revision": gen_cfg.get("model_revision") or gen_cfg.get("revision") or "–",
        "suite": gen_cfg.get("suite", "–"),
        "images": len(gens),
        "prompts": gens["prompt_id"].nunique() if len(gens) else 0,
        "modes": ", ".join(sorted(gens["mode"].unique())) if len(gens) else "–",
        "scheduler / steps / guidance": " / ".join(str(gen_cfg.get(k, "–")) for k in ("scheduler", "steps", "guidance")),
        "size": f"{gen_cfg.get('width', '–')}x{gen_cfg.get('height', '–')}",
        "seed": gen_cfg.get("seed", "–"),
    }
    doc.table(pd.DataFrame({"": list(facts), "value": [str(v) for v in facts.values()]}))
    stages = info.get("stages", {})
    if stages:
        doc.table(pd.DataFrame([{"stage": k, "seconds": v.get("seconds"), "finished": v.get("finished")}
                                for k, v in stages.items()]))
    stale = _stale_stages(run, gens)
    if stale:
        doc.p("**Not every stage covers every image:** " + "; ".join(stale) + ". The sections below describe "
              "what those stages saw; rerun them (they resume) and then `diffaudit report` to cover the rest.")


def _stale_stages(run: Run, gens: pd.DataFrame) -> list[str]:
    """Stages whose tables cover fewer of the run's images than it holds (e.g. generation was extended)."""
    ids = set(gens["image_id"]) if len(gens) else set()
    if not ids:
        return []
    covered = {}
    probe_tables = [t for t in run.tables() if t.startswith("probes/")]
    if probe_tables:
        covered["the bias audit (`diffaudit audit bias RUN`)"] = set().union(
            *(set(run.read_table(t)["image_id"]) for t in probe_tables))
    rates = run.read_table("memorization/rates") if "memorization/rates" in run.tables() else pd.DataFrame()
    if len(rates):  # per prompt: the images of each prompt checked when the stage ran
        done = dict(zip(rates["prompt_id"], rates["images"], strict=True))
        now = gens.groupby("prompt_id").size()
        missing = int(sum(max(0, n - done.get(p, 0)) for p, n in now.items()))
        covered["the memorization check (`diffaudit audit memorization RUN --index IDX`)"] = len(ids) - missing
    stamps = run.read_table("provenance/stamps") if "provenance/stamps" in run.tables() else pd.DataFrame()
    if len(stamps):
        covered["stamping (`diffaudit stamp RUN`)"] = set(stamps["image_id"])
    out = []
    for stage, seen in covered.items():
        n = len(ids & seen) if isinstance(seen, set) else seen
        if n < len(ids):
            out.append(f"{stage} covers {n} of {len(ids)} images")
    return out


def _bias(doc: Doc, run: Run) -> None:
    doc.h(2, "Bias")
    doc.p(CAVEAT)
    summary = run.read_table("bias/summary")
    if summary.empty:
        doc.p("No bias audit in this run yet (`diffaudit audit bias RUN`).")
        return
    pooled = summary[summary["template"] == "all"]
    gender = pooled[(pooled["attribute"] == "perceived_gender") & (pooled["label"] == "woman")]
    referenced = gender[gender["reference_share"].notna()]
    with_ref = referenced[referenced["share"].notna()].sort_values("gap")
    if len(referenced):
        doc.h(3, "Perceived women against the BLS 2022 workforce")
    if len(referenced) and not len(with_ref):
        doc.p(f"None of the {len(referenced)} occupations with a BLS reference has a non-abstained image for "
              "perceived gender, so there is nothing to compare: the probe abstained on every image.")
    if len(with_ref):
        cols = {"subject": "occupation", "n": "n", "abstention_rate": "abstained", "share": "share", "ci": "95% CI",
                "reference_share": "BLS",
                "gap": "gap", "gap_ci": "gap CI", "q_value": "q (BH)", "amplified": "amplified"}

        def fmt(df: pd.DataFrame) -> pd.DataFrame:
            out = df.assign(ci=[_interval(a, b) for a, b in zip(df.ci_low, df.ci_high, strict=True)],
                            gap_ci=[_interval(a, b) for a, b in zip(df.gap_ci_low, df.gap_ci_high, strict=True)])
            out = out[list(cols)].rename(columns=cols)
            for c in ("share", "BLS", "gap", "abstained"):
                out[c] = [_pct(v) for v in out[c]]
            out["q (BH)"] = [f"{v:.3g}" if pd.notna(v) else "–" for v in out["q (BH)"]]
            return out

        over = with_ref[with_ref["gap"] > 0].sort_values("gap", ascending=False).head(TOP_N)
        under = with_ref[with_ref["gap"] < 0].head(TOP_N)
        doc.p("Most over-represented (more perceived women than in the workforce):")
        doc.table(fmt(over))
        doc.p("Most under-represented (fewer perceived women than in the workforce):")
        doc.table(fmt(under))
        amplified = int(with_ref["amplified"].fillna(False).astype(bool).sum())
        significant = int((with_ref["q_value"] < 0.05).sum())
        both = int((with_ref["amplified"].fillna(False).astype(bool) & (with_ref["q_value"] < 0.05)).sum())
        doc.p(f"**Amplification:** {amplified} of {len(with_ref)} occupations with a BLS reference are further "
              f"from parity than their workforce; {significant} differ from the BLS share at q < 0.05 "
              f"(Benjamini-Hochberg across occupations), and {both} are both. Sampling noise alone puts about "
              "half of the shares further from parity than an exactly matching workforce: count the last figure.")
        doc.svg(interval_chart(with_ref, "woman"), "share of perceived women per occupation vs BLS")
    no_ref = gender[gender["reference_share"].isna()]
    if len(no_ref):
        doc.p(f"{len(no_ref)} subject(s) have no BLS reference (unmapped or below the BLS 50,000 threshold): "
              + ", ".join(sorted(no_ref["subject"].astype(str))) + ".")
    all_abstained = gender[gender["share"].isna()]
    if len(all_abstained):
        doc.p(f"{len(all_abstained)} subject(s) have no non-abstained image for perceived gender, so no share: "
              + ", ".join(sorted(all_abstained["subject"].astype(str))) + ".")
    _fair_diffusion(doc, gender, run.info.get("generation", {}).get("suite"))
    _abstention(doc, run, pooled)
    metrics = run.read_table("bias/metrics")
    overall = metrics[(metrics["subject"] == "all") & (metrics["template"] == "all")]
    if len(overall):
        doc.h(3, "Figures comparable with HEIM and DALL-Eval")
        doc.p("Means over subjects with 95% bootstrap intervals (images resampled within subjects). "
              "`gender_imbalance` is HEIM's |share of women - 0.5|; `mad` is DALL-Eval's mean absolute "
              "deviation from a uniform label distribution; `entropy` is normalised (1 = uniform). Near parity "
              "or a zero gap these means are pushed up by sampling noise and their bootstrap intervals can miss "
              "the truth; the per-occupation intervals above do not have that problem.")
        doc.table(overall[["probe", "attribute", "metric", "value", "ci_low", "ci_high", "subjects", "n"]].round(3))


def _fair_diffusion(doc: Doc, gender: pd.DataFrame, suite: str | None) -> None:
    """The run's perceived-women shares beside Fair Diffusion's published SD 1.5 counts for the same
    occupations: a second reference, from a model and a classifier, where BLS is a workforce."""
    from audit.reference import beside_fair_diffusion

    if not suite:
        return
    try:
        both = beside_fair_diffusion(gender, suite)
    except DiffauditError:  # the suite file has moved since generation: no subjects to match
        return
    if both.empty:
        return
    overlap = int(((both.ci_low <= both.ci_high_fd) & (both.ci_low_fd <= both.ci_high)).sum())
    doc.h(3, "Against Fair Diffusion's published Stable Diffusion 1.5 counts")
    text = (f"Fair Diffusion (Friedrich et al. 2023) published perceived-gender counts of SD 1.5 images for these "
            f"occupations, read by the FairFace classifier (another classifier than this run's, so compare "
            f"directions and sizes, not decimals). {len(both)} occupation(s) are in both; the two 95% intervals "
            f"overlap for {overlap}.")
    if len(both) >= 5:
        from scipy.stats import spearmanr

        rho = spearmanr(both["share"], both["share_woman"]).statistic
        text += f" Rank correlation of the shares across occupations (Spearman): {rho:.2f}."
    doc.p(text)
    table = both.head(TOP_N)
    doc.p("Largest differences:")
    doc.table(pd.DataFrame({
        "occupation": table["subject"], "n": table["n"], "share": [_pct(v) for v in table["share"]],
        "95% CI": [_interval(a, b) for a, b in zip(table.ci_low, table.ci_high, strict=True)],
        "SD 1.5 (FD)": [_pct(v) for v in table["share_woman"]],
        "FD 95% CI": [_interval(a, b) for a, b in zip(table.ci_low_fd, table.ci_high_fd, strict=True)],
        "FD n": table["n_fd"]}))
    doc.svg(interval_chart(both.assign(reference_share=both["share_woman"]).sort_values("share_woman"), "woman",
                           reference="Fair Diffusion's SD 1.5 share"),
            "share of perceived women per occupation vs Fair Diffusion's SD 1.5 counts")


def _abstention(doc: Doc, run: Run, pooled: pd.DataFrame) -> None:
    """Abstention per probe and attribute (the images each share above left out), with the reasons."""
    doc.h(3, "Abstention and face detection")
    doc.p("Over the subject x template images the shares above count (edits of source photos are left out).")
    from prompts.suites import EDIT_TEMPLATE

    gens = run.read_table("generations")
    counted = set(gens.loc[gens["template"] != EDIT_TEMPLATE, "image_id"])  # the images the shares count
    rows = []
    per_subject = pooled.drop_duplicates(["probe", "attribute", "subject"])
    for (probe, attribute), g in per_subject.groupby(["probe", "attribute"], sort=True):
        voted, abstained = int(g["n"].sum()), int(g["abstained"].sum())
        t = run.read_table(f"probes/{probe}") if f"probes/{probe}" in run.tables() else pd.DataFrame()
        t = t[t["image_id"].isin(counted)] if len(t) else t
        reasons = (t.loc[t["abstained"] & (t["attribute"] == attribute), "abstain_reason"].fillna("unspecified")
                   .value_counts() if len(t) else pd.Series(dtype=int))
        rows.append({"probe": probe, "attribute": attribute, "images": voted + abstained,
                     "abstained": _pct(abstained / max(voted + abstained, 1)),
                     "reasons (rows)": ", ".join(f"{k} ({v})" for k, v in reasons.items()) or "–"})
    doc.table(pd.DataFrame(rows))
    if "probes/faces" in run.tables():
        t = run.read_table("probes/faces")
        t = t[t["image_id"].isin(counted)]
        n_img = t["image_id"].nunique()
        if n_img:
            faces = t[t["face_index"] >= 0].groupby("image_id").size()
            doc.p(f"Face detector: no face in {_pct(1 - len(faces) / n_img)} of {n_img} images, several faces in "
                  f"{_pct((faces > 1).sum() / n_img)} (the largest face votes).")


def _memorization(doc: Doc, run: Run) -> None:
    doc.h(2, "Memorization")
    matches = run.read_table("memorization/matches")
    if not run.has_table("memorization/matches"):
        doc.p("No memorization check in this run (`diffaudit audit memorization RUN --index IDX`).")
        return
    rates = run.read_table("memorization/rates")
    confirmed = matches[matches["verdict"] != "unconfirmed"]
    doc.p(f"{matches['image_id'].nunique()} generated image(s) had a hash candidate in the training index; "
          f"{confirmed['image_id'].nunique()} confirmed as near-copies by tile-L2/SSIM.")
    if len(confirmed):
        show = confirmed[["image_id", "train_key", "hamming", "tile_l2", "ssim", "verdict"]].copy()
        doc.table(show.round(3))
        pairs = []
        gens = run.read_table("generations").set_index("image_id")
        for r in confirmed.head(6).itertuples(index=False):
            if r.image_id in gens.index:
                pairs.append((f"generated {r.image_id}", _thumb(run.path(gens.loc[r.image_id, "path"]))))
            if r.evidence_path:
                pairs.append((f"training {r.train_key}", _thumb(run.path(r.evidence_path))))
        if len(confirmed) > 6:
            doc.p(f"Generated and training images of the first 6 of {len(confirmed)} pairs:")
        doc.images([p for p in pairs if p[1]])
    if len(rates):
        doc.p("Per-prompt memorization rates (prompts with a match):")
        hit = rates[rates["matched"] > 0]
        doc.table(hit.assign(rate=[_pct(v) for v in hit["rate"]],
                             ci=[_interval(a, b) for a, b in zip(hit.ci_low, hit.ci_high, strict=True)])
                  [["prompt_id", "images", "matched", "rate", "ci"]])


def _thumb(path: Path, size: int = 160) -> bytes:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return buf.getvalue()
    except OSError:
        return b""


def _memorization_scores(doc: Doc, run: Run) -> None:
    """Wen et al.'s prompt scores (``memorization/prompt_scores``): works with or without an index."""
    doc.h(2, "Memorization scores (no training set needed)")
    gens = run.read_table("generations")
    if not run.has_table("memorization/prompt_scores"):
        has = len(gens) and gens["mem_score_step1"].notna().any()
        doc.p("Scores were recorded while generating; score the prompts with `diffaudit audit memorization RUN`."
              if has else "No memorization scores in this run (generated before diffaudit recorded them, imported, "
                          "without classifier-free guidance, or with negative prompts).")
        return
    table = run.read_table("memorization/prompt_scores")
    stage = (run.info.get("stages") or {}).get("memorization_scores") or {}
    scored = table[table["score"].notna()]
    flagged = scored[scored["flagged"].fillna(False).astype(bool)]
    doc.p("Wen et al. (ICLR 2024): when a prompt makes a model reproduce a training image, the text-conditional "
          "noise prediction || eps(x_t, prompt) - eps(x_t, empty) || is abnormally large from the first denoising "
          "step. It is read from the guidance step while generating (no extra model call); a prompt's score is the "
          "mean over its images. Published accuracy on SD 1.x: AUC about 0.96. **A flag is evidence, not proof**: "
          "confirm flagged prompts against an index of the training data (`--index`).")
    thr = stage.get("threshold", table["threshold"].iloc[0] if len(table) else float("nan"))
    doc.p(f"{len(scored)} of {len(table)} prompts scored ({stage.get('statistic', 'step1')} statistic); "
          f"**{len(flagged)} flagged** above the threshold {thr:.3g} ({stage.get('threshold_source', '?')}: "
          f"{stage.get('threshold_note', '')}).")
    if len(scored):
        groups = {str(k): g["score"].to_numpy(float) for k, g in scored.groupby(scored["suite"].fillna("-"))}
        doc.svg(score_histogram(groups, float(thr)), "histogram of prompt scores with the threshold")
    auc = stage.get("auc")
    if auc:
        doc.p(f"**Detector check on this run:** AUC {auc['auc']:.3f} (95% bootstrap CI {auc['auc_ci'][0]:.3f}-"
              f"{auc['auc_ci'][1]:.3f}) between {auc['memorized_prompts']} known-memorized (memorized_sd1) and "
              f"{auc['ordinary_prompts']} ordinary (ordinary_sd1) prompts; {_pct(auc['tpr_at_1pct_fpr'])} of the "
              f"memorized prompts caught at 1% false positives; at the threshold, {_pct(auc['tpr_at_threshold'])} "
              f"caught and {_pct(auc['fpr_at_threshold'])} of ordinary prompts flagged."
              + (f" ({auc['note']}.)" if auc.get("note") else ""))
    show = flagged.head(TOP_N * 2)
    if len(show):
        doc.p("Most suspicious flagged prompts (copy found: confirmed against an index; – : not checked):")
        doc.table(pd.DataFrame({
            "rank": show["rank"], "prompt": [str(p)[:80] for p in show["prompt"]], "suite": show["suite"],
            "score": show["score"].round(3), "images above": show["images_above"].astype(str) + "/" +
            show["scored"].astype(str),
            "copy found": ["–" if pd.isna(c) else ("yes" if c else "no") for c in show["copy_found"]]}))
        first = gens.drop_duplicates("prompt_id").set_index("prompt_id")["path"]
        doc.images([(f"#{int(r.rank)} {r.prompt_id}", _thumb(run.path(first[r.prompt_id])))
                    for r in show.head(6).itertuples() if r.prompt_id in first.index
                    and _thumb(run.path(first[r.prompt_id]))])
    if str((run.info.get("generation") or {}).get("model")) == "tiny":
        doc.p("On the tiny model (random weights) these scores prove the plumbing, not memorization.")


def score_histogram(groups: dict[str, list[float] | object], threshold: float, bins: int = 30) -> str:
    """Inline SVG: stacked histogram of prompt scores per group (suite) and a red line at the threshold."""
    import numpy as np

    values = np.concatenate([np.asarray(v, float) for v in groups.values()])
    hi = float(max(values.max(), threshold) * 1.05) or 1.0
    edges = np.linspace(0.0, hi, bins + 1)
    counts = {k: np.histogram(np.asarray(v, float), edges)[0] for k, v in groups.items()}
    top = max(1, int(np.sum(list(counts.values()), axis=0).max()))
    width, height, left, bottom = 720, 220, 40, 30
    x = lambda v: left + (width - left - 10) * v / hi  # noqa: E731
    y = lambda c: height - bottom - (height - bottom - 10) * c / top  # noqa: E731
    colours = [("#1f77b4", "blue"), ("#ff7f0e", "orange"), ("#2ca02c", "green"), ("#9467bd", "purple"),
               ("#8c564b", "brown")]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 16}" font-size="12">']
    base = np.zeros(bins)
    for i, c in enumerate(counts.values()):
        for b in range(bins):
            if c[b]:
                parts.append(f'<rect x="{x(edges[b]):.1f}" y="{y(base[b] + c[b]):.1f}" '
                             f'width="{max(1.0, x(edges[b + 1]) - x(edges[b]) - 1):.1f}" '
                             f'height="{y(base[b]) - y(base[b] + c[b]):.1f}" fill="{colours[i % len(colours)][0]}"/>')
        base = base + c
    tx = x(threshold)
    parts.append(f'<line x1="{tx:.1f}" y1="5" x2="{tx:.1f}" y2="{height - bottom}" stroke="#d62728" stroke-width="2"/>')
    parts.append(f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" y2="{height - bottom}" stroke="#555"/>')
    for t in np.linspace(0, hi, 6):
        parts.append(f'<text x="{x(t):.1f}" y="{height - bottom + 14}" text-anchor="middle">{t:.2g}</text>')
    legend = "; ".join(f"{colours[i % len(colours)][1]}: {html.escape(k)}" for i, k in enumerate(counts))
    parts.append(f'<text x="{left}" y="{height + 12}" fill="#555">prompts per score (max {top} per bar); '
                 f'red line: threshold {threshold:.3g}; {legend}</text></svg>')
    return "".join(parts)


def _provenance(doc: Doc, run: Run) -> None:
    doc.h(2, "Provenance")
    stamps = run.read_table("provenance/stamps")
    if stamps.empty:
        doc.p("No stamped outputs in this run (`diffaudit stamp RUN`).")
    else:
        counts = stamps["status"].value_counts()
        marked = int(stamps["payload"].notna().sum())
        doc.p(f"{len(stamps)} image(s) stamped with C2PA content credentials. Verification: "
              + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ".")
        asked = ((run.info.get("stages") or {}).get("stamp") or {}).get("watermark")
        methods = sorted(set(stamps["watermark"].dropna()) - {"none"})
        if asked == "none" and not marked:
            doc.p("No invisible watermark was asked for (`--watermark none`): stamps rely on their manifest and "
                  "the store's perceptual hash.")
        else:
            doc.p(f"Invisible watermark ({', '.join(methods) or asked or '–'}): embedded in {marked} of {len(stamps)} "
                  "image(s)" + ("; the others are below the 256x256 pixels the watermark needs, and rely on their "
                                "manifest and the store's perceptual hash." if marked < len(stamps) else "."))
    robust = run.read_table("provenance/robustness")
    if len(robust):
        doc.p("Watermark robustness (bit accuracy and detection rate per attack):")
        doc.table(robust.round(3))
