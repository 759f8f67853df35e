"""``diffaudit dashboard [RUNS_DIR]``: the read-only Streamlit dashboard over a folder of runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import typer

from diffaudit.commands import app

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def streamlit_command(runs_dir: Path, *, port: int, host: str) -> tuple[list[str], dict[str, str]]:
    """The ``streamlit run`` command line and environment that serve the dashboard on ``runs_dir``."""
    import importlib.util

    spec = importlib.util.find_spec("dashboard")
    if spec is None or not spec.submodule_search_locations:
        from diffaudit.errors import ConfigError

        raise ConfigError("the dashboard package is not installed; reinstall diffaudit (`pip install -e .`)")
    app_path = Path(next(iter(spec.submodule_search_locations))) / "app.py"
    from dashboard import RUNS_DIR_ENV

    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path),
           "--server.address", host, "--server.port", str(port),
           "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--server.runOnSave", "false",
           "--server.maxUploadSize", "20", "--global.developmentMode", "false",
           "--client.toolbarMode", "minimal"]
    env = {**os.environ, RUNS_DIR_ENV: str(runs_dir)}
    return cmd, env


@app.command("dashboard")
def dashboard(
    runs_dir: Path = typer.Argument(Path("runs"), help="Folder holding run folders (or one run folder)."),
    port: int = typer.Option(8501, "--port", min=1, max=65535, help="Port to serve on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; the default serves this machine only."),
) -> None:
    """Serve the read-only dashboard (bias, memorization, provenance, compare) for the runs in RUNS_DIR."""
    from diffaudit.errors import InputError

    root = runs_dir.expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"no folder at {runs_dir}; pass the folder that holds your runs (default: ./runs)")
    cmd, env = streamlit_command(root, port=port, host=host)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"diffaudit dashboard on {root} (read-only): http://{shown}:{port}")
    if host not in LOOPBACK:
        typer.echo(f"warning: bound to {host}; anyone who can reach this address can read these runs", err=True)
    proc = subprocess.Popen(cmd, env=env)
    # `kill PID` on this command stops the server too instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        return
    if code:
        raise typer.Exit(code)
