"""Statistics commands: ``diffaudit probe validate`` (a probe against your labels) and ``diffaudit plan``
(how many images an audit needs)."""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.commands import app

probe_app = typer.Typer(help="Check a probe against labelled images.", no_args_is_help=True)
app.add_typer(probe_app, name="probe")


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"  # x != x: NaN


@probe_app.command("validate")
def probe_validate(
    labels: Path = typer.Option(..., "--labels", help="CSV with columns image_id (or path) and label."),
    run: Path = typer.Option(..., "--run", help="The run folder whose images were labelled."),
    probe: str = typer.Option("clip", "--probe", help="Probe table to validate (probes/<name>.parquet)."),
    attribute: str = typer.Option("perceived_gender", "--attribute"),
    classes: str = typer.Option(None, "--classes",
                                help="Comma-separated classes the probe can give (default: the registered "
                                     "probe's labels, else those it gave)."),
    correct: bool = typer.Option(True, "--correct/--no-correct",
                                 help="Also print Rogan-Gladen corrected shares from bias/summary (two classes)."),
    confidence: float = typer.Option(0.95, "--confidence", min=0.5, max=0.999),
) -> None:
    """Per-class sensitivity and specificity (Wilson intervals) of a probe on your labelled images."""
    from rich.console import Console
    from rich.table import Table

    from audit.validation import correct_summary, validate_probe
    from diffaudit.errors import InputError
    from diffaudit.runs import Run

    r = Run.open(run)
    table_name = f"probes/{probe}"
    if not r.has_table(table_name):
        have = [t.split("/", 1)[1] for t in r.tables() if t.startswith("probes/")]
        raise InputError(f"run {r.name} has no {table_name} table (it has: {', '.join(have) or 'none'}); "
                         "run `diffaudit audit bias RUN` first")
    if classes:
        known = [c.strip() for c in classes.split(",") if c.strip()]
    else:  # the registered probe's declared labels: a class it never predicted is still valid
        from diffaudit.registry import PROBES

        declared = PROBES.load(probe).labels.get(attribute) if probe in PROBES else None
        known = list(declared) if declared else None
    result = validate_probe(labels, r.read_table(table_name), attribute=attribute, classes=known,
                            generations=r.read_table("generations"), run_root=r.root, alpha=1 - confidence)
    console = Console()
    level = f"{confidence:.0%}"
    t = Table("class", "labelled", f"sensitivity ({level} CI)", f"specificity ({level} CI)", "abstained",
              title=f"{probe} / {attribute} on {labels.name}")
    for d in result.to_dict("records"):
        t.add_row(str(d["class"]), str(d["positives"]),
                  f"{_pct(d['sensitivity'])} ({_pct(d['sensitivity_ci_low'])}-{_pct(d['sensitivity_ci_high'])})",
                  f"{_pct(d['specificity'])} ({_pct(d['specificity_ci_low'])}-{_pct(d['specificity_ci_high'])})",
                  f"{d['abstained']} ({_pct(d['abstention_rate'])})")
    console.print(t)
    if not (correct and len(result) == 2 and r.has_table("bias/summary")):
        return
    summary = r.read_table("bias/summary")
    summary = summary[summary["template"] == "all"]
    fixed = correct_summary(summary, result, probe=probe, attribute=attribute, confidence=confidence)
    c = Table("subject", "label", "n", "observed", f"corrected ({level} CI, both uncertainties)",
              title="Rogan-Gladen corrected shares (pooled over templates)")
    for row in fixed[fixed["label"] == result["class"].iloc[-1]].itertuples(index=False):
        c.add_row(row.subject, row.label, str(row.n), _pct(row.share),
                  f"{_pct(row.corrected_share)} ({_pct(row.corrected_ci_low)}-{_pct(row.corrected_ci_high)})")
    console.print(c)
    for note in fixed["corrected_note"].dropna().unique():
        console.print(f"note: not corrected for {note}", highlight=False, soft_wrap=True)


@app.command("plan")
def plan_command(
    effect: float = typer.Option(..., "--effect", help="Smallest departure of a share to detect, e.g. 0.10."),
    power: float = typer.Option(0.8, "--power"),
    alpha: float = typer.Option(0.05, "--alpha"),
    baseline: float = typer.Option(0.5, "--baseline", help="The share under test, e.g. parity or a BLS share."),
    occupations: int = typer.Option(1, "--occupations", help="Number of subjects tested (153 for the suite)."),
    correction: str = typer.Option("bonferroni", "--correction", help="bonferroni, bh or none."),
    differing: int = typer.Option(None, "--differing", help="With bh: occupations expected to truly differ."),
    templates: int = typer.Option(1, "--templates", help="Templates pooled per subject."),
    abstention: float = typer.Option(0.0, "--abstention", help="Expected share of images the probe abstains on."),
) -> None:
    """How many images per prompt an audit needs to detect a share of baseline ± effect."""
    from audit.planning import plan

    p = plan(effect, power=power, alpha=alpha, baseline=baseline, occupations=occupations, correction=correction,
             differing=differing, templates=templates, abstention=abstention)
    typer.echo(f"images per prompt: {p.images_per_prompt}  "
               f"({p.images_per_prompt * templates} per subject over {templates} template(s), "
               f"{p.images_per_subject_drawn} needed with abstention; "
               f"{p.total_images} images for {occupations} subject(s))")
    typer.echo(f"usable images per subject: {p.images_per_subject} (normal approximation), "
               f"{p.exact_images_per_subject} (exact binomial test); exact power at {p.images_per_subject}: "
               f"{p.exact_power:.3f}")
    for a in p.assumptions:
        typer.echo(f"assuming: {a}")
