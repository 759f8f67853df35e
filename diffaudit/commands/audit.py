"""End-to-end commands: ``audit run``, ``report`` and ``demo``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import typer

from diffaudit.commands import app, audit_app


@audit_app.command("run")
def audit_run(config: Path = typer.Argument(..., help="Audit config YAML (see examples/)."),
              out: str = typer.Option(None, "--out", help="Override the config's run folder.")) -> None:
    """Generate -> bias probes -> statistics -> memorization -> stamp -> report; resumable, skips done stages."""
    from diffaudit.pipeline import load_audit_config, run_audit

    cfg = load_audit_config(config)
    if out:
        cfg = cfg.model_copy(update={"out": out})
    run = run_audit(cfg)
    typer.echo(f"report: {run.root / 'report.html'}")


@app.command("report")
def report(run: Path = typer.Argument(..., help="A run folder.")) -> None:
    """Rebuild report.md and report.html from the run's tables."""
    from diffaudit.report import build_report

    md, html = build_report(run)
    typer.echo(f"{md}\n{html}")


@app.command("demo")
def demo(runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where the demo writes its runs."),
         images_per_prompt: int = typer.Option(4, "--images-per-prompt", "-n", min=1),
         dashboard: bool = typer.Option(True, "--dashboard/--no-dashboard", help="Start the dashboard after."),
         port: int = typer.Option(8501, "--port")) -> None:
    """Offline demo audit on the built-in tiny model, then the dashboard."""
    from diffaudit.demo import NOTICE, run_demo

    cfg = run_demo(runs_dir, images_per_prompt=images_per_prompt)
    run = Path(cfg.out)
    typer.echo(f"verify the stamped outputs yourself:  diffaudit verify {run / 'provenance' / 'stamped'} "
               f"--trust-anchors {Path(cfg.provenance.identity) / 'root-ca.pem'}")
    typer.echo(NOTICE)
    if dashboard:
        exe = shutil.which("diffaudit") or sys.executable
        cmd = [exe] if exe.endswith("diffaudit") else [exe, "-m", "diffaudit"]
        typer.echo(f"starting the dashboard on http://127.0.0.1:{port} (Ctrl-C to stop)")
        subprocess.run([*cmd, "dashboard", str(runs_dir), "--port", str(port)], env=os.environ, check=False)
