"""The offline demo (`make demo`): a signing identity, the tiny model, a demo audit with every
generation mode, a memorization index built from the photos the edits start from, stamps verified,
the report, then the dashboard. Everything lives under one runs folder; nothing is downloaded.

Beside the tiny model's noise, the demo audits a *reference set of real photos* that scikit-image ships
(``runs/demo-reference``: the astronaut, the cameraman and 16 of the lfw faces; real images, not model
output), so a newcomer sees faces found by the real detector, their perceived labels from two probes
(the shipped face-attribute classifier and the tiny CLIP), how far the two agree and the skin measures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from diffaudit.config import AuditConfig, BiasConfig, GenerationConfig, MemorizationConfig, ProvenanceConfig

DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket")
REFERENCE_NOTICE = (
    "REFERENCE SET: runs/demo-reference holds real photos that scikit-image ships (the astronaut, the "
    "cameraman, 16 faces of lfw_subset), not model output. Faces are found by the real MTCNN detector and "
    "labelled by the shipped face-attribute classifier (dlib, CC0) and by the tiny random CLIP (made to vote "
    "on every image here), so their agreement shows what chance agreement looks like."
)
REFERENCE_PHOTOS = ("astronaut", "camera")
REFERENCE_LFW = 16
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
        provenance=ProvenanceConfig(identity=str(runs_dir / "demo-identity"), watermark="ssTile",
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
    log(REFERENCE_NOTICE)
    reference = run_reference(runs_dir, log=log)
    for line in reference_summary(reference):
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
    from audit.memorization import verdicts as vd

    matches = run.read_table("memorization/matches")
    counts = vd.image_counts(matches)  # the counts run.json, the rates, the report and the dashboard show
    hit = vd.image_verdicts(matches).map(vd.is_hit)
    hit_prompts = sorted(matches.loc[matches["image_id"].isin(hit.index[hit]), "prompt_id"].unique())
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
        f"[summary] memorization: {matches['image_id'].nunique()} image(s) had a hash candidate among the training "
        f"photos, {counts['matched_images']} matched one in pixels ({counts['memorized_images']} {vd.MEMORIZED}, "
        f"{counts['near_duplicate_images']} {vd.NEAR_DUPLICATE}; {', '.join(hit_prompts) or 'no prompt'})",
        f"[summary] provenance: {len(verified)} stamped copies verified against the demo root CA: "
        + ", ".join(f"{k} {v}" for k, v in sorted(states.items())),
    ]


def lfw_canvases() -> tuple[list, list]:
    """The 100 face and 100 non-face crops of ``skimage.data.lfw_subset()`` as 200x200 RGB images: each 25x25
    grey crop upscaled 4x (bicubic) in the middle of a canvas of its mean grey, so a detector sees the face
    with some context (the crops are cut tight at forehead and chin). Faces first, then non-faces."""
    import cv2
    import numpy as np
    import skimage.data

    out = []
    for crop in skimage.data.lfw_subset():
        grey = np.round(crop * 255).astype(np.uint8)
        canvas = np.full((200, 200), int(grey.mean()), dtype=np.uint8)
        canvas[50:150, 50:150] = cv2.resize(grey, (100, 100), interpolation=cv2.INTER_CUBIC)
        out.append(np.repeat(canvas[:, :, None], 3, axis=2))
    return out[:100], out[100:]


def write_reference_run(root: Path):
    """A run of real photos (not model output) in the run-folder layout, so every bias stage reads it."""
    import numpy as np
    import pandas as pd
    import skimage.data
    from PIL import Image

    from diffaudit.runs import Run, sha256_bytes

    run = Run.create(root, {"generation": {
        "suite": "reference-photos", "model": "reference-photos", "kind": "reference", "reference_set": True,
        "source": "real photos shipped by scikit-image (astronaut, camera, lfw_subset); not generated"}})
    if run.has_table("generations"):
        return run
    images = [(name, np.asarray(Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
                                .resize((512, 512), Image.Resampling.BICUBIC))) for name in REFERENCE_PHOTOS]
    images += [("lfw", face) for face in lfw_canvases()[0][:REFERENCE_LFW]]
    rows = []
    for i, (name, pixels) in enumerate(images):
        prompt_id = f"photo-{name}"
        path = run.image_path(prompt_id, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        h, w = pixels.shape[:2]
        rows.append(dict(image_id=f"{prompt_id}-{i}", prompt_id=prompt_id, suite="reference-photos",
                         template="real_photo", subject=f"{name} (real photo)", prompt="", negative_prompt="",
                         mode="txt2img", index=i, seed=i, model="reference-photos", scheduler="none", steps=0,
                         guidance=0.0, width=w, height=h, path=run.image_relpath(prompt_id, i),
                         sha256=sha256_bytes(path.read_bytes()), seconds=0.0))
    run.write_table("generations", pd.DataFrame(rows))
    return run


def run_reference(runs_dir: str | Path = "runs", *, log: Callable[[str], None] = print):
    """Audit the reference set of real photos with every probe and write its report; return the run."""
    from audit.bias import audit_bias
    from diffaudit.report import build_report

    run = write_reference_run(Path(runs_dir) / "demo-reference")
    result = audit_bias(run, clip_model="tiny", reference=None, progress=False,
                        clip_options={"min_margin": 0.0, "person_threshold": 0.0})
    md, _ = build_report(run.root)
    log(f"[reference] probed {len(run.read_table('generations'))} real photos in {result.seconds:.1f} s; "
        f"report: {md.with_suffix('.html')}")
    return run


def reference_summary(run) -> list[str]:
    """What the probes said about the reference photos: faces, both probes' labels, agreement, skin."""
    from audit.stats import pick

    faces = run.read_table("probes/faces")
    n_img = faces["image_id"].nunique()
    found = faces.loc[faces["face_index"] >= 0, "image_id"].nunique()
    detector = faces["probe_version"].iloc[0].split("+", 1)[1].split(":")[0] if len(faces) else "?"
    lines = [f"[reference] faces found by {detector} in {found} of {n_img} real photos"]
    attr, clip = pick(run.read_table("probes/faces_attr")), pick(run.read_table("probes/clip"))
    skin = pick(run.read_table("probes/skin_tone")).set_index(["image_id", "attribute"])
    for name in REFERENCE_PHOTOS:
        image_id = f"photo-{name}-{REFERENCE_PHOTOS.index(name)}"
        said = []
        for probe, v in (("faces_attr", attr), ("clip (random weights)", clip)):
            labels = v[v["image_id"] == image_id].set_index("attribute")["label"]
            said.append(f"{probe}: {labels.get('perceived_gender') or 'abstained'}, "
                        f"{labels.get('perceived_age') or 'abstained'}")
        tone = ""
        if (image_id, "skin_lightness") in skin.index and not skin.loc[(image_id, "skin_lightness"), "abstained"]:
            tone = (f"; skin L* {skin.loc[(image_id, 'skin_lightness'), 'score']:.0f}, "
                    f"h* {skin.loc[(image_id, 'skin_hue'), 'score']:.0f} deg, "
                    f"{skin.loc[(image_id, 'skin_tone'), 'label']}")
        else:
            tone = "; skin: abstained (a grey photo has no skin colour)"
        lines.append(f"[reference] {name}: " + "; ".join(said) + tone)
    kappas = run.read_table("bias/agreement")
    for r in kappas[kappas["subject"] == "all"].itertuples(index=False):
        k = "undefined" if r.kappa != r.kappa else (f"{r.kappa:.2f} [{r.kappa_ci_low:.2f}, {r.kappa_ci_high:.2f}]")
        lines.append(f"[reference] agreement {r.probe_a} vs {r.probe_b} on {r.attribute}: {r.agree} of {r.n} "
                     f"images, kappa {k} (random CLIP: chance agreement expected)")
    return lines
