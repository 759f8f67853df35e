"""`diffaudit audit run`: bad configs fail before anything is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diffaudit.config import AuditConfig, GenerationConfig, ProvenanceConfig
from diffaudit.errors import DiffauditError
from diffaudit.pipeline import run_audit


@pytest.mark.parametrize("config, message", [
    (dict(generation=GenerationConfig(suite="nosuch")), "unknown suite 'nosuch'"),
    (dict(generation=GenerationConfig(suite="demo", subjects=("astronaut_chef",))), "has no subject"),
    (dict(provenance=ProvenanceConfig(watermark="bogus")), "unknown watermark 'bogus'"),
    (dict(provenance=ProvenanceConfig(identity="/nonexistent/identity")), "no signing identity"),
    (dict(generation=GenerationConfig(model="/nonexistent/model")), "/nonexistent/model"),
])
def test_bad_config_leaves_no_run(tmp_path, config, message):
    out = tmp_path / "run"
    with pytest.raises(DiffauditError, match=message):
        run_audit(AuditConfig(out=str(out), **config), log=lambda m: None)
    assert not out.exists()


def test_misspelt_bls_row_fails_before_generation(tmp_path):
    """A typo in a suite's bls: field used to surface only at the bias stage, after hours of generation."""
    from diffaudit.config import BiasConfig

    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ndescription: x\nsources: [x]\n"
                     "templates: [{id: t, text: 'a photo of {a} {subject}'}]\n"
                     "subjects: [{id: ceo, text: CEO, bls: 'Chief executive officers'}]\n")
    out = tmp_path / "run"
    with pytest.raises(DiffauditError, match="'Chief executive officers', which is not a row"):
        run_audit(AuditConfig(out=str(out), generation=GenerationConfig(suite=str(suite)), bias=BiasConfig()),
                  log=lambda m: None)
    assert not out.exists()


def test_bad_config_file_via_cli(tmp_path):
    cfg = tmp_path / "audit.yaml"
    cfg.write_text(f"out: {tmp_path / 'run'}\ngeneration:\n  suite: demo\n  widht: 64\n")
    res = subprocess.run([sys.executable, "-m", "diffaudit", "audit", "run", str(cfg)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and f"{cfg}:4: field 'generation.widht'" in res.stderr
    assert not (tmp_path / "run").exists()


def test_bad_out_fails_before_the_model_loads(tmp_path, monkeypatch):
    import generate.runner as runner

    def never(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(runner, "load_pipelines", never)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    with pytest.raises(DiffauditError, match="not a diffaudit run"):
        run_audit(AuditConfig(out=str(out)), log=lambda m: None)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_missing_memorization_sources_fail_before_anything_runs(tmp_path):
    from diffaudit.config import MemorizationConfig

    config = AuditConfig(out=str(tmp_path / "run"), provenance=None, memorization=MemorizationConfig(
        index=str(tmp_path / "idx"), sources=(str(tmp_path / "no-such-folder"),)))
    with pytest.raises(DiffauditError, match="no-such-folder"):
        run_audit(config, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_example_demo_config_is_what_the_demo_runs():
    from diffaudit.demo import demo_config
    from diffaudit.pipeline import load_audit_config

    examples = Path(__file__).resolve().parents[1] / "examples"
    assert load_audit_config(examples / "demo.yaml") == demo_config("runs")
    for name in ("sd15", "sd21", "sdxl"):  # the GPU examples at least validate
        assert load_audit_config(examples / f"{name}-occupations.yaml").generation.suite == "occupations"


def test_a_second_audit_run_is_refused_before_its_model_loads(tmp_path, monkeypatch):
    """A concurrent `audit run` into the same run used to load its model (~19 s on a real one) first."""
    import os

    import generate.runner as runner
    from diffaudit.errors import RunLockedError
    from diffaudit.runs import Run

    run = Run.create(tmp_path / "run")
    hold = ("import sys, time\nfrom diffaudit.runs import Run\nwith Run.open(sys.argv[1]).lock():\n"
            "    print('locked', flush=True)\n    time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", hold, str(run.root)], env=env, stdout=subprocess.PIPE, text=True)

    def never(*a, **k):
        raise AssertionError("the model was loaded before the run's lock was taken")

    monkeypatch.setattr(runner, "load_pipelines", never)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"locked by pid {proc.pid}"):
            run_audit(AuditConfig(out=str(run.root), provenance=None), log=lambda m: None)
    finally:
        proc.kill()
        proc.wait()
