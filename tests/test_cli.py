"""The CLI: fast help without torch, one-line errors with exit code 2 on bad input."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import make_photo_run


def diffaudit(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffaudit", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_help_is_fast_and_imports_no_stage():
    code = ("import sys, time; t = time.perf_counter(); import diffaudit.cli; "
            "print(time.perf_counter() - t); "
            "print(sorted(m for m in ('torch', 'diffusers', 'open_clip', 'c2pa', 'streamlit', 'cv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[1] == "[]", f"CLI start-up imported heavy modules: {out[1]}"
    start = time.perf_counter()
    res = diffaudit("--help")
    elapsed = time.perf_counter() - start
    assert res.returncode == 0 and "suites" in res.stdout and "audit" in res.stdout
    assert elapsed < 5, f"diffaudit --help took {elapsed:.2f}s"  # generous bound for a loaded CI box


def test_suites_and_list_commands():
    res = diffaudit("suites", "show", "demo", "--json")
    assert res.returncode == 0 and res.stdout.count("\n") == 15
    assert "heim_face-ceo" in res.stdout
    res = diffaudit("list", "probes")
    assert res.returncode == 0 and res.stdout.split("\n")[0].startswith("clip\t")
    assert diffaudit("list", "suites").stdout.split() == ["demo", "descriptors", "memorization-sd1", "memorized-sd1",
                                                         "occupations", "ordinary-sd1"]


@pytest.mark.parametrize("args, message", [
    (("suites", "show", "no-such-suite"), "unknown suite 'no-such-suite'"),
    (("runs", "show", "/nonexistent/run"), "no run folder at /nonexistent/run"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    res = diffaudit(*args)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: ") and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_malformed_suite_file_via_cli(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndescription: x\nsources: [a]\ntemplates:\n  - {id: t, text: no slot}\nsubjects: []\n")
    res = diffaudit("suites", "show", str(bad))
    assert res.returncode == 2 and f"{bad}:5: field 'templates.0.text'" in res.stderr


def test_suites_show_checks_bls_rows(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("name: s\ndescription: x\nsources: [x]\ntemplates: [{id: t, text: 'a photo of {a} {subject}'}]\n"
                   "subjects: [{id: ceo, text: CEO, bls: 'Chief executive officers'}]\n")
    res = diffaudit("suites", "show", str(bad))
    assert res.returncode == 2 and "'Chief executive officers', which is not a row" in res.stderr


def test_runs_show_takes_the_name_runs_list_prints(tmp_path):
    from diffaudit.runs import Run

    Run.create(tmp_path / "runs" / "r1")
    listed = diffaudit("runs", "list", cwd=tmp_path)
    assert listed.returncode == 0 and "r1" in listed.stdout
    res = diffaudit("runs", "show", "r1", cwd=tmp_path)
    assert res.returncode == 0 and str((tmp_path / "runs" / "r1").resolve()) in res.stdout.replace("\n", "")


def test_debug_shows_traceback():
    res = diffaudit("--debug", "suites", "show", "no-such-suite")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_runs_list_and_show(tmp_path):
    make_photo_run(tmp_path / "runs" / "a", photos=("astronaut", "coffee"), size=64)
    res = diffaudit("runs", "list", str(tmp_path / "runs"))
    assert res.returncode == 0 and "a" in res.stdout and "photos" in res.stdout
    res = diffaudit("runs", "show", str(tmp_path / "runs" / "a"))
    assert res.returncode == 0 and "table generations: 2 rows" in res.stdout


def test_locked_run_is_one_line_exit_2(tmp_path):
    import signal

    run = make_photo_run(tmp_path / "r", photos=("astronaut",), size=64)
    hold = ("import sys, time\nfrom diffaudit.runs import Run\nwith Run.open(sys.argv[1]).lock():\n"
            "    print('locked', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(run.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        res = diffaudit("audit", "bias", str(run.root), "--clip-model", "tiny")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert res.returncode == 2 and f"is locked by pid {proc.pid}" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not run.has_table("probes/clip")  # nothing written


def test_ctrl_c_inside_a_command_says_the_work_is_saved(monkeypatch, capsys):
    """Typer turns a KeyboardInterrupt inside a command into exit 130 itself; the one line still comes."""
    import prompts.suites
    from diffaudit.cli import INTERRUPTED, main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prompts.suites, "list_suites", interrupted)
    with pytest.raises(SystemExit) as done:
        main(["suites", "list"])
    assert done.value.code == 130 and INTERRUPTED in capsys.readouterr().err
