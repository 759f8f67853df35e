"""The end-to-end audit: generate -> bias -> memorization -> stamp -> report, over one run folder.

This module and the CLI are the only places that call several stages. Each stage is resumable on
its own; here a stage whose inputs did not change since it last finished is skipped. Its inputs are
fingerprinted (its config section and the generations table it reads) in ``run.json`` under
``pipeline``, with its wall time.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from diffaudit.config import AuditConfig, load_model
from diffaudit.errors import ConfigError
from diffaudit.runs import Run, now

STAGES = ("generate", "bias", "memorization", "stamp", "report")


def load_audit_config(path: str | Path) -> AuditConfig:
    """Load an audit config YAML; errors name the file, line and field."""
    return load_model(AuditConfig, path, ConfigError)


def _fingerprint(stage: str, config: AuditConfig, run: Run) -> str:
    section = {"generate": config.generation, "bias": config.bias, "memorization": config.memorization,
               "stamp": config.provenance, "report": None}[stage]
    h = hashlib.sha256(stage.encode())
    h.update(json.dumps(section.model_dump(mode="json") if section else None, sort_keys=True).encode())
    if stage != "generate":
        table = run.table_path("generations")
        h.update(table.read_bytes() if table.is_file() else b"")
    if stage == "memorization":  # a rebuilt or extended index is a new input
        meta = Path(config.memorization.index) / "meta.json"
        h.update(meta.read_bytes() if meta.is_file() else b"")
    return h.hexdigest()[:16]


def preflight(config: AuditConfig) -> None:
    """Check the config's names and files before anything is written (bad input leaves no run behind)."""
    from diffaudit.registry import PROBES, WATERMARKS
    from prompts.suites import expand

    g = config.generation
    expand(g.suite, images_per_prompt=g.images_per_prompt, seed=g.seed, templates=g.templates,
           subjects=g.subjects, edits=g.edits)
    if config.bias is not None:
        for name in config.bias.probes:
            if name not in PROBES:
                PROBES.load(name)  # raises, listing the choices
        if config.bias.reference is not None:
            from audit.reference import subject_reference

            subject_reference(g.suite, config.bias.reference)  # a misspelt bls: row fails now, not after generation
    m = config.memorization
    if m is not None and not Path(m.index).exists():
        if not m.sources:
            raise ConfigError(f"memorization index {m.index} does not exist and no sources are given to build it")
        import glob

        missing = [s for s in m.sources if not Path(s).exists() and not glob.glob(s)]
        if missing:
            raise ConfigError(f"memorization source(s) {missing} do not exist (needed to build {m.index})")
    if config.provenance is not None:
        if config.provenance.watermark != "none" and config.provenance.watermark not in WATERMARKS:
            WATERMARKS.load(config.provenance.watermark)  # raises, listing the choices
        if config.provenance.identity is not None:
            from provenance.keys import load_identity

            load_identity(config.provenance.identity)


def _generate(run: Run, config: AuditConfig, pipelines: object = None) -> None:
    from generate.runner import generate_run

    generate_run(run.root, config.generation, pipelines=pipelines)


def _bias(run: Run, config: AuditConfig) -> None:
    from audit.bias import audit_bias

    cfg = config.bias
    audit_bias(run.root, probes=cfg.probes, clip_model=cfg.clip_model, reference=cfg.reference,
               face_detector=cfg.face_detector, face_model=cfg.face_model,
               clip_options={"min_margin": cfg.min_margin, "person_threshold": cfg.person_threshold},
               face_options={"min_margin": cfg.min_margin})


def _memorization(run: Run, config: AuditConfig) -> None:
    from audit.memorization.build import build_index
    from audit.memorization.check import check_run

    cfg = config.memorization
    if not Path(cfg.index).exists():
        build_index(list(cfg.sources), cfg.index, hash_name=cfg.hash)
    check_run(run.root, cfg.index, radius=cfg.radius)


def _stamp(run: Run, config: AuditConfig) -> None:
    from provenance.keys import load_identity
    from provenance.stamp import stamp_run

    cfg = config.provenance
    stamp_run(run.root, identity=load_identity(cfg.identity), watermark=cfg.watermark, store=cfg.store)


def _report(run: Run, config: AuditConfig) -> None:
    from diffaudit.report import build_report

    build_report(run.root)


_RUNNERS: dict[str, Callable[[Run, AuditConfig], None]] = {
    "bias": _bias, "memorization": _memorization, "stamp": _stamp, "report": _report}
_ENABLED: dict[str, Callable[[AuditConfig], bool]] = {
    "generate": lambda c: True, "bias": lambda c: c.bias is not None,
    "memorization": lambda c: c.memorization is not None, "stamp": lambda c: c.provenance is not None,
    "report": lambda c: True}


def run_audit(config: AuditConfig, *, log: Callable[[str], None] = print) -> Run:
    """Run every enabled stage in order, skipping those already done with the same inputs.

    Everything that can be checked before writing is checked first (names, files, and the model when
    generation has to run), so bad input leaves no run folder behind.
    """
    preflight(config)
    out = Path(config.out)
    with Run.reserve(out):  # a second audit of this run is refused now, not after its model loads
        previous = Run.open(out).info.get("pipeline", {}) if Run.is_run(out) else {}
        pipelines = None
        if previous.get("generate", {}).get("fingerprint") != _fingerprint("generate", config, Run(out)):
            from generate.runner import plan_run

            pipelines = plan_run(out, config.generation).pipes  # loads the model once, writes nothing
        run = Run.create(out, {"audit": config.model_dump(mode="json")})
        for stage in STAGES:
            if not _ENABLED[stage](config):
                log(f"[{stage}] not configured, skipped")
                continue
            done = run.info.get("pipeline", {}).get(stage, {})
            if stage != "report" and done.get("fingerprint") == _fingerprint(stage, config, run):
                log(f"[{stage}] already done ({done.get('seconds')} s on {done.get('finished')}), skipped")
                continue
            log(f"[{stage}] running")
            start = time.perf_counter()
            if stage == "generate":
                _generate(run, config, pipelines)
            else:
                _RUNNERS[stage](run, config)
            seconds = round(time.perf_counter() - start, 3)
            fp = _fingerprint(stage, config, run)  # after the stage: it may create an input (the index)
            run.update_info({"pipeline": {stage: {"fingerprint": fp, "seconds": seconds, "finished": now()}}})
            log(f"[{stage}] done in {seconds:.1f} s")
    return run
