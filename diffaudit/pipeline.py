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
    return h.hexdigest()[:16]


def _generate(run: Run, config: AuditConfig) -> None:
    from generate.runner import generate_run

    generate_run(run.root, config.generation)


def _bias(run: Run, config: AuditConfig) -> None:
    from audit.bias import audit_bias

    cfg = config.bias
    audit_bias(run.root, probes=cfg.probes, clip_model=cfg.clip_model, reference=cfg.reference,
               face_detector=cfg.face_detector,
               clip_options={"min_margin": cfg.min_margin, "person_threshold": cfg.person_threshold})


def _memorization(run: Run, config: AuditConfig) -> None:
    from audit.memorization.build import build_index
    from audit.memorization.check import check_run

    cfg = config.memorization
    if not Path(cfg.index).exists():
        if not cfg.sources:
            raise ConfigError(f"memorization index {cfg.index} does not exist and no sources are given to build it")
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
    "generate": _generate, "bias": _bias, "memorization": _memorization, "stamp": _stamp, "report": _report}
_ENABLED: dict[str, Callable[[AuditConfig], bool]] = {
    "generate": lambda c: True, "bias": lambda c: c.bias is not None,
    "memorization": lambda c: c.memorization is not None, "stamp": lambda c: c.provenance is not None,
    "report": lambda c: True}


def run_audit(config: AuditConfig, *, log: Callable[[str], None] = print) -> Run:
    """Run every enabled stage in order, skipping those already done with the same inputs."""
    run = Run.create(config.out, {"audit": config.model_dump(mode="json")})
    for stage in STAGES:
        if not _ENABLED[stage](config):
            log(f"[{stage}] not configured, skipped")
            continue
        fp = _fingerprint(stage, config, run)
        done = run.info.get("pipeline", {}).get(stage, {})
        if stage != "report" and done.get("fingerprint") == fp:
            log(f"[{stage}] already done ({done.get('seconds')} s on {done.get('finished')}), skipped")
            continue
        log(f"[{stage}] running")
        start = time.perf_counter()
        _RUNNERS[stage](run, config)
        seconds = round(time.perf_counter() - start, 3)
        run.update_info({"pipeline": {stage: {"fingerprint": fp, "seconds": seconds, "finished": now()}}})
        log(f"[{stage}] done in {seconds:.1f} s")
    return run
