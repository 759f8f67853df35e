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
import re
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
        """The Markdown report. Headings, table cells and captions come from data and are escaped whole
        (``md_text``); paragraphs keep the little Markdown the sections write (`code`, *emphasis*) but lose
        every way to HTML, links and images (``md_paragraph``): a key or prompt from a user's file renders
        as the text it is."""
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + md_text(b[2]))
            elif b[0] == "p":
                out.append(md_paragraph(b[1]))
            elif b[0] == "table":
                out.append(_md_table(b[1]))
            elif b[0] == "svg":
                out.append(f"*(chart in report.html: {md_text(b[2])})*")
            elif b[0] == "images":
                out.append("*(evidence images in report.html: " + ", ".join(md_text(c) for c, _ in b[1]) + ")*")
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
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)
    return re.sub(r"\*([^*]+)\*", r"<i>\1</i>", t)


# Markdown's punctuation that can start markup (CommonMark lets a backslash make any of them literal). A link,
# image or reference needs an unescaped "[", so "]" may stay as it is: "[12, 34]" reads "\[12, 34]".
_MD_PUNCT = re.compile(r"([\\`*\[<>#|!~$&]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")
# Paragraphs keep ` and * (the sections' own code and emphasis); these still go: raw HTML and autolinks
# (<), links and images ([ !), entities (&), headings (#) and the escapes that could undo ours (\).
_MD_STRUCTURE = re.compile(r"([\\\[<>#!&|])")
_NEWLINES = re.compile(r"[\r\n\t\v\f\u2028\u2029]+")


def md_text(value: object) -> str:
    """A value from data as literal Markdown text, on one line: no HTML, links, images or emphasis."""
    return _MD_PUNCT.sub(r"\\\1", _NEWLINES.sub(" ", str(value)))


def md_paragraph(text: str) -> str:
    """A section's paragraph (its prose with values from data in it) as one Markdown paragraph that keeps
    `code` and *emphasis* but can hold no raw HTML, link, image, heading or block of another kind."""
    return _MD_STRUCTURE.sub(r"\\\1", _NEWLINES.sub(" ", text).strip())


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "*(none)*"
    cols = [md_text(c) for c in df.columns]
    rows = [["–" if (isinstance(v, float) and math.isnan(v)) or v is None else md_text(v) for v in r]
            for r in df.itertuples(index=False)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
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
    _versus_reference(doc, run)
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


UNKNOWN = "unknown"


def _values(column: pd.Series, top: int = 4) -> str:
    """What a generations column holds, saying *unknown* where it is null: ``ddim``, ``dall-e-3 (10),
    midjourney (4); unknown for 2 of 16`` or ``unknown``."""
    n, known = len(column), column.dropna()
    if not len(known):
        return UNKNOWN
    counts = known.astype(str).value_counts()
    text = str(counts.index[0]) if len(counts) == 1 else ", ".join(
        f"{v} ({c})" for v, c in counts.head(top).items()) + (f", {len(counts) - top} more" if len(counts) > top else "")
    if len(known) < n:
        text += f"; {UNKNOWN} for {n - len(known)} of {n}"
    return text


def _what_was_audited(doc: Doc, info: dict, gen_cfg: dict, gens: pd.DataFrame, run: Run) -> None:
    """Model, suite, sizes, settings and seeds; for imported runs what each image's source told, and
    *unknown* for what it did not (sampler, steps, seeds are rarely recorded by other tools)."""
    doc.h(2, "What was audited")
    imported, kind = bool(gen_cfg.get("imported")), gen_cfg.get("kind", "model")
    col = lambda name: gens[name] if name in gens else pd.Series([None] * len(gens), dtype=object)  # noqa: E731
    facts: dict[str, object] = {}
    if imported:
        what = ("real images, imported as a reference (not a model's outputs)" if kind == "reference"
                else "images made elsewhere, imported")
        facts["images from"] = f"{what}: {', '.join(gen_cfg.get('sources', [])) or UNKNOWN}"
        named = col("model_source").dropna().value_counts()
        facts["model"] = _values(col("model")) + (
            " (named by " + ", ".join(f"{_MODEL_SOURCE.get(k, k)} for {v}" for k, v in named.items()) + ")"
            if len(named) else "")
        facts["model revision"] = _values(col("model_revision"))
    else:
        facts["model"] = gen_cfg.get("model", UNKNOWN)
        facts["model revision"] = gen_cfg.get("model_revision") or gen_cfg.get("revision") or UNKNOWN
    facts["suite"] = gen_cfg.get("suite") or ("none (subjects as the source named them)" if imported else UNKNOWN)
    facts["images"] = len(gens)
    facts["prompts"] = gens["prompt_id"].nunique() if len(gens) else 0
    if imported:
        prompts = col("prompt")
        facts["prompt text"] = (f"known for {int(prompts.notna().sum())} of {len(gens)} images"
                                if prompts.isna().any() else "known for every image")
    facts["modes"] = _values(col("mode")) if len(gens) else "–"
    if imported:
        facts["sampler / steps / guidance"] = " / ".join(_values(col(k)) for k in ("scheduler", "steps", "guidance"))
        facts["size"] = _values(pd.Series([f"{w}x{h}" for w, h in zip(col("width"), col("height"), strict=True)],
                                          dtype=object))
        seeds = col("seed")
        facts["seeds"] = (f"{UNKNOWN} for every image" if seeds.isna().all() else
                          f"known for {int(seeds.notna().sum())} of {len(gens)} images (from the source)")
        status = col("c2pa_status").dropna().value_counts()
        status = status.reindex(sorted(status.index, key=lambda k: (_C2PA_ORDER.index(k) if k in _C2PA_ORDER else 9, k)))
        facts["embedded C2PA credentials on import"] = (", ".join(f"{_C2PA.get(k, k)} {v}" for k, v in status.items())
                                                        if len(status) else "not read")
        if col("c2pa_manifest").fillna(False).astype(bool).any():
            facts["credentials' claim generator"] = _values(col("c2pa_claim_generator").dropna())
            facts["credentials' source type"] = _values(col("c2pa_source_type").dropna())
    else:
        facts["scheduler / steps / guidance"] = " / ".join(str(gen_cfg.get(k, UNKNOWN))
                                                           for k in ("scheduler", "steps", "guidance"))
        facts["size"] = f"{gen_cfg.get('width', UNKNOWN)}x{gen_cfg.get('height', UNKNOWN)}"
        facts["seed"] = gen_cfg.get("seed", UNKNOWN)
    doc.table(pd.DataFrame({"": list(facts), "value": [str(v) for v in facts.values()]}))
    if imported:
        doc.p("These images were imported, not generated here: what their source did not record (often the "
              "sampler, steps and seeds, sometimes the prompt or the model) is marked *unknown*, never filled "
              "with a default. The bias and memorization figures do not need it; reproducing an image does.")
    if kind == "reference":
        doc.p("**A reference run** holds real images: its shares describe the data, not a model. Compare a "
              f"model's run against it with `diffaudit compare MODEL_RUN --reference {run.root}`.")
    stages = info.get("stages", {})
    if stages:
        doc.table(pd.DataFrame([{"stage": k, "seconds": v.get("seconds"), "finished": v.get("finished")}
                                for k, v in stages.items()]))
    stale = _stale_stages(run, gens)
    if stale:
        doc.p("**Not every stage covers every image:** " + "; ".join(stale) + ". The sections below describe "
              "what those stages saw; rerun them (they resume) and then `diffaudit report` to cover the rest.")


_C2PA = {"none": "no manifest"}
_C2PA_ORDER = ["Trusted", "Valid", "Invalid", "none"]
_MODEL_SOURCE = {"manifest": "the import manifest", "c2pa": "valid embedded credentials", "option": "--model"}


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
    if run.is_reference:
        doc.p("**These images are a reference set of real photos, not model output:** "
              + str(run.info["generation"].get("source", "real photos")) + ". They show what the probes say "
              "about real faces; no figure here describes a generative model.")
    summary = run.read_table("bias/summary")
    if summary.empty:
        doc.p("No bias audit in this run yet (`diffaudit audit bias RUN`).")
        return
    _agreement(doc, run)
    _faces_found(doc, run)
    pooled = summary[summary["template"] == "all"]
    genders = pooled[(pooled["attribute"] == "perceived_gender") & (pooled["label"] == "woman")]
    # The dedicated face classifier first: Fair Diffusion's counts, set beside it, came from one (FairFace).
    order = sorted(genders["probe"].unique(), key=lambda p: (p != "faces_attr", p))
    suite = run.info.get("generation", {}).get("suite")
    for probe in order:
        gender = genders[genders["probe"] == probe]
        _gender_vs_reference(doc, gender, probe if len(order) > 1 else None)
        _fair_diffusion(doc, gender, suite, probe if len(order) > 1 else None)
    _abstention(doc, run, pooled)
    _skin(doc, run)
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


def _gender_vs_reference(doc: Doc, gender: pd.DataFrame, probe: str | None) -> None:
    """One probe's perceived-women shares against the BLS workforce (``probe`` named when several ran)."""
    referenced = gender[gender["reference_share"].notna()]
    with_ref = referenced[referenced["share"].notna()].sort_values("gap")
    if len(referenced):
        doc.h(3, "Perceived women against the BLS 2022 workforce" + (f" ({probe})" if probe else ""))
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
    if len(no_ref) and len(referenced):
        doc.p(f"{len(no_ref)} subject(s) have no BLS reference (unmapped or below the BLS 50,000 threshold): "
              + ", ".join(sorted(no_ref["subject"].astype(str))) + ".")
    all_abstained = gender[gender["share"].isna()]
    if len(all_abstained):
        doc.p(f"{len(all_abstained)} subject(s) have no non-abstained image for perceived gender"
              + (f" from {probe}" if probe else "") + ", so no share: "
              + ", ".join(sorted(all_abstained["subject"].astype(str))) + ".")


def _fair_diffusion(doc: Doc, gender: pd.DataFrame, suite: str | None, probe: str | None = None) -> None:
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
    doc.h(3, "Against Fair Diffusion's published Stable Diffusion 1.5 counts" + (f" ({probe})" if probe else ""))
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


def _kappa_text(k: float, lo: float, hi: float) -> str:
    return "undefined" if pd.isna(k) else f"{k:.2f} [{lo:.2f}, {hi:.2f}]" if pd.notna(lo) else f"{k:.2f}"


def _agreement(doc: Doc, run: Run) -> None:
    """How far two probes that label the same attribute agree (``bias/agreement``): leads the bias section,
    since a share is only as trustworthy as the classifier that counted it."""
    from audit.agreement import lowest_agreement_first

    table = run.read_table("bias/agreement")
    if table.empty or not (table["n"] > 0).any():
        return
    doc.h(3, "Do the probes agree?")
    doc.p("Two probes labelled the same attribute of the same images. Raw agreement is the share of images both "
          "labelled alike (95% Wilson interval); Cohen's kappa corrects it for the agreement their label shares "
          "alone would give by chance (95% interval from the Dirichlet posterior of the confusion table). Kappa near 0 means chance, 1 "
          "perfect agreement; a share counted by one probe is only as trustworthy as its agreement with another. "
          "Images either probe abstained on are counted apart, not as disagreements.")
    overall = table[table["subject"] == "all"]
    doc.table(pd.DataFrame({
        "probes": [f"{a} vs {b}" for a, b in zip(overall.probe_a, overall.probe_b, strict=True)],
        "attribute": overall["attribute"], "images": overall["images"], "both labelled": overall["n"],
        "raw agreement": [f"{_pct(v)} {_interval(lo, hi)}" for v, lo, hi in
                          zip(overall.raw_agreement, overall.raw_ci_low, overall.raw_ci_high, strict=True)],
        "chance": [_pct(v) for v in overall["chance_agreement"]],
        "kappa [95% CI]": [_kappa_text(k, lo, hi) for k, lo, hi in
                           zip(overall.kappa, overall.kappa_ci_low, overall.kappa_ci_high, strict=True)],
        "abstained (a / b)": [f"{a} / {b}" for a, b in zip(overall.abstained_a, overall.abstained_b, strict=True)]}))
    if ((run.info.get("stages") or {}).get("bias") or {}).get("clip_model") == "tiny":
        doc.p("CLIP here is the tiny model with random weights: its agreement with any real classifier is at "
              "chance, which is what the kappa above should show.")
    cells = run.read_table("bias/confusion")
    for r in overall.itertuples(index=False):
        c = cells[(cells.probe_a == r.probe_a) & (cells.probe_b == r.probe_b) & (cells.attribute == r.attribute)
                  & (cells.subject == "all")]
        if r.n and len(c):
            grid = c.pivot_table(index="label_a", columns="label_b", values="count", aggfunc="sum", sort=False)
            doc.p(f"Confusion of {r.attribute} (rows: {r.probe_a}, columns: {r.probe_b}; images both labelled):")
            doc.table(grid.reset_index().rename(columns={"label_a": f"{r.probe_a} / {r.probe_b}"}))
    per = lowest_agreement_first(table[(table["subject"] != "all") & (table["n"] > 0)])
    if len(per):
        doc.p(f"Lowest agreement by subject (first {TOP_N} of {len(per)}):")
        doc.table(pd.DataFrame({
            "subject": per["subject"].head(TOP_N), "probes": [f"{a} vs {b}" for a, b in zip(
                per.probe_a.head(TOP_N), per.probe_b.head(TOP_N), strict=True)],
            "attribute": per["attribute"].head(TOP_N), "n": per["n"].head(TOP_N),
            "raw agreement": [_pct(v) for v in per["raw_agreement"].head(TOP_N)],
            "kappa [95% CI]": [_kappa_text(k, lo, hi) for k, lo, hi in zip(
                per.kappa.head(TOP_N), per.kappa_ci_low.head(TOP_N), per.kappa_ci_high.head(TOP_N), strict=True)]}))


def _faces_found(doc: Doc, run: Run, limit: int = 8) -> None:
    """The first images with a detected face: box, detector, and what each probe read from that face."""
    from audit.stats import pick

    if "probes/faces" not in run.tables():
        return
    faces = run.read_table("probes/faces")
    boxes = faces[faces["attribute"] == "face"]
    if boxes.empty:
        return
    detector = boxes["probe_version"].iloc[0].split("+", 1)[-1]
    votes = {name: pick(run.read_table(f"probes/{name}")).set_index(["image_id", "attribute"])
             for name in ("faces_attr", "clip", "skin_tone") if f"probes/{name}" in run.tables()}
    gens = run.read_table("generations").set_index("image_id")
    rows, pictures = [], []
    for image_id, g in list(boxes.groupby("image_id", sort=False))[:limit]:
        areas = [float(b[2]) * float(b[3]) for b in g["bbox"]]
        big = g.iloc[areas.index(max(areas))]  # the largest face votes (audit.stats.pick)
        said = {}
        for name, v in votes.items():
            for attribute in ("perceived_gender", "perceived_age", "skin_tone", "skin_lightness"):
                if (image_id, attribute) in v.index:
                    r = v.loc[(image_id, attribute)]
                    said[(name, attribute)] = "abstained" if r["abstained"] else str(r["label"])
        lightness = votes.get("skin_tone")
        lstar = (lightness.loc[(image_id, "skin_lightness"), "score"]
                 if lightness is not None and (image_id, "skin_lightness") in lightness.index else None)
        rows.append({"image": image_id, "faces": len(g), "largest face (x, y, w, h)": ", ".join(
            f"{v:.0f}" for v in big["bbox"]), "detector score": f"{big['score']:.3f}",
            "faces_attr": ", ".join(said.get(("faces_attr", a), "–") for a in ("perceived_gender", "perceived_age")),
            "clip": ", ".join(said.get(("clip", a), "–") for a in ("perceived_gender", "perceived_age")),
            "skin (Monk, L*)": f"{said.get(('skin_tone', 'skin_tone'), '–')}, "
                               + ("–" if lstar is None or pd.isna(lstar) else f"{lstar:.0f}")})
        if image_id in gens.index:
            pictures.append((f"{image_id}: " + rows[-1]["faces_attr"], _thumb_boxes(run.path(gens.loc[image_id, "path"]),
                                                                                  list(g["bbox"]))))
    doc.h(3, "Faces found")
    doc.p(f"The first {len(rows)} of {boxes['image_id'].nunique()} images with a face, as the detector "
          f"(`{detector}`) found them, with what each probe read from the largest face (the face that votes).")
    doc.table(pd.DataFrame(rows))
    doc.images([p for p in pictures if p[1]])


def _thumb_boxes(path: Path, boxes: list, size: int = 160) -> bytes:
    """A thumbnail with the detected face boxes drawn on it."""
    from PIL import Image, ImageDraw

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            draw = ImageDraw.Draw(im)
            width = max(2, im.width // 160)
            for x, y, w, h in boxes:
                draw.rectangle([x, y, x + w, y + h], outline=(255, 40, 40), width=width)
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return buf.getvalue()
    except OSError:
        return b""


def _skin(doc: Doc, run: Run) -> None:
    """Apparent skin colour per subject (L*, h*, ITA) and perceived gender x skin-tone group shares."""
    from audit.skin import SKIN_GROUP_EDGES

    skin = run.read_table("bias/skin")
    if skin.empty or not (skin["n"] > 0).any():
        return
    doc.h(3, "Apparent skin colour beyond one number")
    doc.p("Per image, the median perceptual lightness L* and hue angle h* (degrees; lower is redder, higher "
          "yellower) of the largest face's skin pixels, beside the ITA that the Monk category comes from (Thong, "
          "Joniak and Xiang, ICCV 2023: ITA mixes lightness and hue). Means with 95% Student-t intervals; images "
          "without a face or with too few skin pixels are counted as abstained. Apparent colour depends on "
          "lighting and rendering, and is never a person's race or ethnicity.")
    pooled = skin[skin["subject"] == "all"]
    per = skin[(skin["subject"] != "all") & (skin["attribute"] == "skin_lightness") & (skin["n"] > 0)]

    def fmt(df: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"subject": df["subject"], "measure": df["measure"], "n": df["n"],
                             "abstained": df["abstained"], "mean [95% CI]": [
                                 "–" if pd.isna(m) else f"{m:.1f}" + ("" if pd.isna(lo) else f" [{lo:.1f}, {hi:.1f}]")
                                 for m, lo, hi in zip(df["mean"], df["ci_low"], df["ci_high"], strict=True)],
                             "median (IQR)": ["–" if pd.isna(m) else f"{m:.1f} ({a:.1f}-{b:.1f})"
                                              for m, a, b in zip(df["median"], df["q25"], df["q75"], strict=True)]})

    doc.table(fmt(pooled))
    if len(per):
        doc.p(f"Lightness L* by subject (darkest first, {min(len(per), TOP_N * 2)} of {len(per)}):")
        doc.table(fmt(per.sort_values("mean").head(TOP_N * 2)))
    inter = run.read_table("bias/intersectional")
    inter = inter[(inter["subject"] == "all") & (inter["n"] > 0)]
    if len(inter):
        low, high = SKIN_GROUP_EDGES
        doc.p(f"Perceived gender x skin-tone group, pooled over subjects: skin-tone groups bin L* at {low:.1f} and "
              f"{high:.1f} (midpoints between the L* of Monk swatches 7 and 8, and 5 and 6: darker, medium, "
              "lighter). Shares with 95% intervals that hold simultaneously over the six cells (Bonferroni Clopper-Pearson); the "
              "bias/intersectional table has every subject.")
        doc.table(pd.DataFrame({
            "gender probe": inter["gender_probe"], "perceived gender": inter["perceived_gender"],
            "skin group": inter["skin_group"], "count": inter["count"], "n": inter["n"],
            "share [simultaneous 95% CI]": [f"{_pct(v)} {_interval(lo, hi)}" for v, lo, hi in zip(
                inter["share"], inter["sim_ci_low"], inter["sim_ci_high"], strict=True)]}))


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


def _versus_reference(doc: Doc, run: Run) -> None:
    """This run's shares beside a reference run's (``compare/reference``, written by ``diffaudit compare``):
    e.g. a model against real photos of the same occupations, as OpenBias compares with real images."""
    if not run.has_table("compare/reference"):
        return
    from diffaudit.runs import sha256_file

    t = run.read_table("compare/reference")
    if t.empty:
        return
    stage = (run.info.get("stages") or {}).get("compare") or {}
    ref = str(t["reference_run"].iloc[0])
    doc.h(3, f"Against the reference run {ref}")
    pooled = t[t["template"] == "all"]
    attribute, label = "perceived_gender", "woman"
    focus = pooled[(pooled["attribute"] == attribute) & (pooled["label"] == label)]
    if focus.empty and len(pooled):  # no gender probe: the label with the clearest difference
        first = pooled.assign(d=pooled["delta"].abs()).sort_values(["q_value", "d"], ascending=[True, False],
                                                                   na_position="last").iloc[0]
        attribute, label = first["attribute"], first["label"]
        focus = pooled[(pooled["attribute"] == attribute) & (pooled["label"] == label)]
    tested = focus[focus["q_value"].notna()]
    more = tested[(tested["q_value"] < 0.05) & (tested["delta"] > 0)]
    fewer = tested[(tested["q_value"] < 0.05) & (tested["delta"] < 0)]
    kind = "real images" if stage.get("reference_kind") == "reference" else "another run"
    text = (f"Shares of this run beside those of `{ref}` ({kind}), probed alike ({', '.join(stage.get('probes', [])) or '–'}). "
            f"`{attribute}` = `{label}`: of {len(tested)} subject(s) with images in both, {len(more)} show a higher "
            f"share here and {len(fewer)} a lower one at q < 0.05 (Fisher's exact test, Benjamini-Hochberg across "
            "subjects); delta = share here - reference share, with Newcombe's 95% interval. What the reference "
            "already holds is in the data; the difference is what this run adds or removes.")
    doc.p(text)
    everywhere = pooled[pooled["q_value"] < 0.05]
    doc.p(f"Over every probe, attribute and label: {len(everywhere)} of {int(pooled['q_value'].notna().sum())} "
          "tested (subject, label) rows differ at q < 0.05"
          + (": " + ", ".join(sorted({f'{a} = {lab}' for a, lab in zip(everywhere.attribute, everywhere.label,
                                                                       strict=True)})[:8]) if len(everywhere) else "")
          + ".")
    for note in stage.get("notes", []):
        doc.p(f"Not compared: {note}.")
    stale = []
    if stage.get("summary_sha256") and run.has_table("bias/summary") and \
            sha256_file(run.table_path("bias/summary")) != stage["summary_sha256"]:
        stale.append("this run's bias summary")
    ref_summary = Path(str(stage.get("reference", ""))) / "bias" / "summary.parquet"
    if stage.get("reference_summary_sha256") and ref_summary.is_file() and \
            sha256_file(ref_summary) != stage["reference_summary_sha256"]:
        stale.append("the reference's bias summary")
    if stale:
        doc.p(f"**Out of date:** {' and '.join(stale)} changed after the comparison; rerun "
              f"`diffaudit compare {run.root} --reference {stage.get('reference', ref)}`.")
    top = focus.head(TOP_N)
    doc.table(pd.DataFrame({
        "subject": top["subject"], "n": top["n"], "share": [_pct(v) for v in top["share"]],
        "95% CI": [_interval(a, b) for a, b in zip(top.ci_low, top.ci_high, strict=True)],
        "reference n": top["reference_n"], "reference": [_pct(v) for v in top["reference_share"]],
        "reference CI": [_interval(a, b) for a, b in zip(top.reference_ci_low, top.reference_ci_high, strict=True)],
        "delta": [f"{100 * v:+.0f} pp" if pd.notna(v) else "–" for v in top["delta"]],
        "delta CI": [_interval(a, b) for a, b in zip(top.delta_ci_low, top.delta_ci_high, strict=True)],
        "q": [f"{v:.3g}" if pd.notna(v) else "–" for v in top["q_value"]]}))
    shown = focus[focus["share"].notna()].sort_values("reference_share")
    if len(shown):
        doc.svg(interval_chart(shown, str(label), reference=f"share in the reference run {ref}"),
                f"share perceived as {label} per subject vs the reference run")


def _memorization(doc: Doc, run: Run) -> None:
    from audit.memorization import verdicts as vd

    doc.h(2, "Memorization")
    matches = run.read_table("memorization/matches")
    if not run.has_table("memorization/matches"):
        doc.p("No memorization check in this run (`diffaudit audit memorization RUN --index IDX`).")
        return
    rates = run.read_table("memorization/rates")
    flagged = int(rates["degenerate"].fillna(0).sum()) if "degenerate" in rates else 0
    n = vd.image_counts(matches)
    stage = (run.info.get("stages") or {}).get("memorization") or {}
    searched = f" (searched with {stage['hash']} at radius {stage['radius']}" if {"hash", "radius"} <= set(stage) else ""
    if searched and stage.get("descriptor"):
        searched += f" and the {stage['descriptor']} descriptor at min similarity {stage.get('min_similarity')}"
    searched += ")" if searched else ""
    doc.p(f"{matches['image_id'].nunique()} generated image(s) had a candidate in the training index{searched}; "
          f"**{n['matched_images']} matched** a training image once aligned and compared in pixels "
          f"({n['memorized_images']} `{vd.MEMORIZED}`: {vd.HELP[vd.MEMORIZED]}; {n['near_duplicate_images']} "
          f"`{vd.NEAR_DUPLICATE}`: {vd.HELP[vd.NEAR_DUPLICATE]}). "
          f"{max(flagged, n['degenerate_images'])} image(s) are `{vd.DEGENERATE}` ({vd.HELP[vd.DEGENERATE]}) and "
          "are never counted. A miss is not proof of absence: the search misses some edited copies.")
    confirmed = matches[matches["verdict"].map(vd.is_hit)]
    if len(confirmed):
        show = confirmed[["image_id", "train_key", "hamming", "agreement", "ssim", "tile_l2", "overlap",
                          "verdict"]].copy()
        show["aligned by"] = [_alignment(r) for r in confirmed.itertuples(index=False)]
        if "source" in confirmed and confirmed["source"].notna().any():  # who proposed it: hash, descriptor, both
            show["found by"] = [s if isinstance(s, str) else "hash" for s in confirmed["source"]]
            show["descriptor sim"] = confirmed["descriptor_sim"]
        doc.table(show.round(3))
        pairs = []
        gens = run.read_table("generations").set_index("image_id")
        for r in confirmed.head(6).itertuples(index=False):
            if r.image_id in gens.index:
                pairs.append((f"generated {r.image_id}", _thumb(run.path(gens.loc[r.image_id, "path"]))))
            aligned = getattr(r, "aligned_path", None)
            if isinstance(aligned, str) and aligned:
                pairs.append((f"training {r.train_key}, aligned", _thumb(run.path(aligned))))
            elif r.evidence_path:
                pairs.append((f"training {r.train_key}", _thumb(run.path(r.evidence_path))))
        if len(confirmed) > 6:
            doc.p(f"Generated and aligned training images of the first 6 of {len(confirmed)} pairs:")
        doc.images([p for p in pairs if p[1]])
    if len(rates):
        doc.p("Per-prompt memorization rates (prompts with a match; rate = matched / judged, judged = images not "
              "degenerate, 95% Wilson interval):")
        hit = rates[rates["matched"] > 0]
        judged = hit["judged"].fillna(hit["images"]).astype(int) if "judged" in hit else hit["images"]
        doc.table(hit.assign(judged=judged, rate=[_pct(v) for v in hit["rate"]],
                             ci=[_interval(a, b) for a, b in zip(hit.ci_low, hit.ci_high, strict=True)])
                  [["prompt_id", "images", "judged", "matched", "rate", "ci"]])


def _alignment(row) -> str:
    """A matches row's alignment in words: method, mirrored, scale and rotation."""
    import json

    method = getattr(row, "alignment", None)
    if not isinstance(method, str):
        return "–"
    words = [method] + (["mirrored"] if getattr(row, "mirrored", None) is True else [])
    try:
        t = json.loads(row.transform)
        words.append(f"x{t['scale']:.2f}, {t['rotation']:+.1f}°")
    except (TypeError, ValueError, KeyError):
        pass
    return ", ".join(words)


def _thumb(path: Path, size: int = 160) -> bytes:
    """A PNG thumbnail for the HTML report, decoded under the pixel cap (``diffaudit.imaging``); b"" if not."""
    from diffaudit.imaging import open_image

    try:
        im = open_image(path, mode="RGB")
    except DiffauditError:
        return b""
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


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
    from diffaudit import verdicts

    doc.h(2, "Provenance")
    stamps = run.read_table("provenance/stamps")
    if stamps.empty:
        doc.p("No stamped outputs in this run (`diffaudit stamp RUN`).")
    else:
        trust = stamps["trust"] if "trust" in stamps else pd.Series([None] * len(stamps), index=stamps.index)
        labels = [f"{s} ({t})" if s == "Trusted" and isinstance(t, str) and t else str(s)
                  for s, t in zip(stamps["status"], trust, strict=True)]
        counts = pd.Series(labels).value_counts()
        marked = int(stamps["payload"].notna().sum())
        doc.p(f"{len(stamps)} image(s) stamped with C2PA content credentials. Checked at stamp time: "
              + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ".")
        if any("development root" in x for x in labels):
            doc.p("*Trusted (development root)* means the stamp validated against the root certificate its own "
                  "identity made (`diffaudit keys init`): self-certification, which vouches for no one else. What a "
                  "verifier sees depends on the trust anchors it is given (`diffaudit verify --trust-anchors`).")
        stage = (run.info.get("stages") or {}).get("stamp") or {}
        asked = stage.get("watermark")
        methods = sorted(set(stamps["watermark"].dropna()) - {"none", "unreadable"})
        unreadable = int((stamps["watermark"] == "unreadable").sum())
        if asked == "none" and not marked:
            doc.p("No invisible watermark was asked for (`--watermark none`): stamps rely on their manifest and "
                  "the store's content fingerprint.")
        else:
            rest = len(stamps) - marked - unreadable
            doc.p(f"Invisible watermark ({', '.join(methods) or asked or '–'}): embedded in {marked} of "
                  f"{len(stamps)} image(s) (each read back after re-encoding)"
                  + (f"; {unreadable} did not read back after re-encoding and carry no registered payload"
                     if unreadable else "")
                  + ("; the others are below the 256x256 pixels the watermark needs" if rest > 0 else "")
                  + ". Every stamp is registered in the manifest store with its content fingerprint"
                  + (f" (`{stage['store']}`)" if stage.get("store") else "") + ".")
    doc.p("`diffaudit verify FILE --store STORE` keeps its evidence apart (the embedded manifest checked now; the "
          "watermark's payload, CRC and false-positive bound; the stored stamps whose fingerprint and pixels agree) "
          "and reaches one of these conclusions (a stored stamp's status is shown as recorded at stamp time, and "
          "re-checked with the verifier's trust settings):")
    doc.table(pd.DataFrame({"conclusion": list(verdicts.CONCLUSIONS), "what it means": list(verdicts.CONCLUSIONS.values())}))
    robust = run.read_table("provenance/robustness")
    if len(robust):
        doc.p("Watermark robustness (bit accuracy and detection rate per attack):")
        doc.table(robust.round(3))
