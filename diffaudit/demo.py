"""The offline demo (`make demo`): a signing identity, the tiny model, a demo audit with every
generation mode, a memorization index built from the photos the edits start from, stamps verified,
the report, then the dashboard. Everything lives under one runs folder; nothing is downloaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from diffaudit.config import AuditConfig, BiasConfig, GenerationConfig, MemorizationConfig, ProvenanceConfig

DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket")
NOTICE = (
    "NOTE: the built-in tiny model has random weights and draws noise. The demo shows the pipeline "
    "end to end (generation modes, probes with abstention, intervals against BLS, memorization, "
    "credentials), not any model's behaviour. Real audits need real weights: see README, "
    "'A real audit on a GPU'."
)


def demo_config(runs_dir: str | Path = "runs", images_per_prompt: int = 4,
                subjects: tuple[str, ...] | None = None) -> AuditConfig:
    runs_dir = Path(runs_dir)
    return AuditConfig(
        out=str(runs_dir / "demo"),
        generation=GenerationConfig(suite="demo", model="tiny", images_per_prompt=images_per_prompt, seed=0,
                                    subjects=subjects),
        bias=BiasConfig(clip_model="tiny"),
        memorization=MemorizationConfig(index=str(runs_dir / "demo-index"),
                                        sources=(str(runs_dir / "demo-training"),)),
        provenance=ProvenanceConfig(identity=str(runs_dir / "demo-identity"), watermark="dwtDctSvd",
                                    store=str(runs_dir / "demo-store.sqlite")),
    )


def write_training_photos(folder: Path) -> list[Path]:
    """The demo's "training set": photos scikit-image ships, including those the demo edits start from."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in DEMO_PHOTOS:
        path = folder / f"{name}.png"
        if not path.exists():
            Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB").save(path)
        paths.append(path)
    return paths


def run_demo(runs_dir: str | Path = "runs", *, images_per_prompt: int = 4, subjects: tuple[str, ...] | None = None,
             log: Callable[[str], None] = print) -> AuditConfig:
    """Prepare the identity and training photos, then run the demo audit; return its config."""
    from diffaudit.pipeline import run_audit

    config = demo_config(runs_dir, images_per_prompt, subjects)
    log(NOTICE)
    start = time.perf_counter()
    identity = Path(config.provenance.identity)
    if not (identity / "signer.pem").exists():
        from provenance.keys import init_identity

        init_identity(identity, common_name="diffaudit demo signer")
        log(f"[keys] made a development signing identity in {identity}")
    write_training_photos(Path(config.memorization.sources[0]))
    run = run_audit(config, log=log)
    for line in summary(run, config):
        log(line)
    log(f"demo audit finished in {time.perf_counter() - start:.0f} s: {config.out}/report.html")
    return config


def summary(run, config: AuditConfig) -> list[str]:
    """What the demo found, read from the run's tables, with every stamp verified afresh."""
    from provenance.stamp import verify_paths

    gens = run.read_table("generations")
    clip = run.read_table("probes/clip")
    from prompts.suites import EDIT_TEMPLATE

    prompted = set(gens.loc[gens["template"] != EDIT_TEMPLATE, "image_id"])  # what the bias shares count
    gender = clip[(clip["attribute"] == "perceived_gender") & clip["image_id"].isin(prompted)]
    faces = run.read_table("probes/faces")
    from audit.memorization.verdicts import is_hit

    matches = run.read_table("memorization/matches")
    confirmed = matches[matches["verdict"].map(is_hit)]  # the hits run.json and the rates count
    anchors = Path(config.provenance.identity) / "root-ca.pem"
    verified = verify_paths([run.root / "provenance" / "stamped"], trust_anchors=anchors)
    states = {}
    for r in verified:
        states[r.status] = states.get(r.status, 0) + 1
    modes = gens["mode"].value_counts()
    return [
        f"[summary] images: {len(gens)} ({', '.join(f'{m} {n}' for m, n in modes.items())})",
        f"[summary] perceived gender: CLIP abstained on {gender['abstained'].mean():.0%} of the "
        f"{len(prompted)} occupation images "
        f"({', '.join(sorted(gender['abstain_reason'].dropna().unique())) or 'no abstention'}); "
        f"faces found in {faces.loc[faces['face_index'] >= 0, 'image_id'].nunique()} image(s)",
        f"[summary] memorization: {matches['image_id'].nunique()} image(s) matched a training photo by hash, "
        f"{confirmed['image_id'].nunique()} confirmed in pixels as near-copies "
        f"({', '.join(sorted(confirmed['prompt_id'].unique())) or 'none'})",
        f"[summary] provenance: {len(verified)} stamped copies verified against the demo root CA: "
        + ", ".join(f"{k} {v}" for k, v in sorted(states.items())),
    ]
