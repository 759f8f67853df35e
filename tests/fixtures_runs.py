"""Synthetic run folders with a valid table for every stage, for the dashboard's tests and bench.

The images are real photos that scikit-image ships (``conftest.skimage_photo``) or, for big runs,
small flat colour tiles; probe rows are made up with known label shares per occupation, and the bias
summary is computed from them by the audit's own ``audit.stats.summarize`` (so it has exactly the
shape the real stage writes). Memorization matches carry an evidence image inside the run;
provenance stamps cover every status.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from diffaudit.runs import Run, sha256_bytes

TEMPLATES = ("heim_face", "plain")
# occupation -> share of images perceived as women in the base run ("aide" has no BLS row).
BASE_SHARES = {"ceo": 0.05, "nurse": 0.95, "software_developer": 0.1, "cashier": 0.7, "janitor": 0.4, "aide": 0.6}
MITIGATED_SHARES = {"ceo": 0.45, "nurse": 0.6, "software_developer": 0.4, "cashier": 0.55, "janitor": 0.5,
                    "aide": 0.5}
PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket")
AGES = ("young_adult", "middle_aged", "older_adult")


def gender_attribute() -> str:
    """The attribute name the BLS reference covers (whatever the audit stage calls it)."""
    from audit.reference import LABEL_SHARES

    return next(iter(LABEL_SHARES))[0]


@cache
def photo_png(index: int, size: int) -> bytes:
    """A real photo (cycled through ``PHOTOS``) as PNG bytes."""
    from conftest import png_bytes, skimage_photo

    return png_bytes(skimage_photo(PHOTOS[index % len(PHOTOS)], size))


@cache
def tile_png(index: int, size: int) -> bytes:
    """A flat colour tile as PNG bytes: cheap enough for 20k-image runs."""
    rng = np.random.default_rng(index % 97)
    arr = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def build_run(root: Path, *, shares: dict[str, float], images_per_prompt: int = 10, size: int = 128,
              image: Callable[[int, int], bytes] = photo_png, model: str = "tiny-sd",
              stages: bool = True) -> Run:
    """A run with generations, probes (clip, faces), bias summary, memorization and provenance tables."""
    from audit.stats import summarize

    run = Run.create(root, {"generation": {"suite": "occupations", "model": model, "images_per_prompt":
                                           images_per_prompt, "steps": 2, "guidance": 7.5}})
    gender = gender_attribute()
    gens, clip, faces = [], [], []
    i = 0
    for subject, share in shares.items():
        women = round(share * images_per_prompt)
        for template in TEMPLATES:
            prompt_id = f"{template}-{subject}"
            for k in range(images_per_prompt):
                seed = 1000 + k
                data = image(i, size)
                rel = run.image_relpath(prompt_id, seed)
                run.path(rel).parent.mkdir(parents=True, exist_ok=True)
                run.path(rel).write_bytes(data)
                image_id = f"{prompt_id}-{seed}"
                gens.append(dict(
                    image_id=image_id, prompt_id=prompt_id, suite="occupations", template=template,
                    subject=subject, prompt=f"a photo of the face of a {subject.replace('_', ' ')}",
                    negative_prompt="", mode="txt2img", index=k, seed=seed, model=model, scheduler="ddim",
                    steps=2, guidance=7.5, width=size, height=size, path=rel, sha256=sha256_bytes(data),
                    seconds=0.01))
                meta = dict(image_id=image_id, probe_version="1")
                if k == images_per_prompt - 1 and template == "plain":  # the probe shows no person here
                    clip.append(dict(meta, face_index=-1, attribute=gender, abstained=True,
                                     abstain_reason="no_person", probe="clip"))
                    clip.append(dict(meta, face_index=-1, attribute="age", abstained=True,
                                     abstain_reason="no_person", probe="clip"))
                    faces.append(dict(meta, face_index=-1, attribute="face_count", abstained=True,
                                      abstain_reason="no_face", probe="faces", score=0.0))
                else:
                    low_margin = k == 0 and template == "heim_face"
                    label = "woman" if k < women else "man"
                    clip.append(dict(meta, face_index=-1, attribute=gender, abstained=low_margin,
                                     label=None if low_margin else label, score=0.9, margin=0.01 if low_margin
                                     else 0.4, abstain_reason="low_margin" if low_margin else None, probe="clip"))
                    clip.append(dict(meta, face_index=-1, attribute="age", abstained=False,
                                     label=AGES[k % len(AGES)], score=0.7, margin=0.3, probe="clip"))
                    faces.append(dict(meta, face_index=0, bbox=[10.0, 10.0, 40.0, 40.0], attribute="face_count",
                                      abstained=False, label="1", score=1.0, probe="faces"))
                i += 1
    gens = pd.DataFrame(gens)
    run.write_table("generations", gens)
    probes = {"clip": pd.DataFrame(clip), "faces": pd.DataFrame(faces)}
    for name, df in probes.items():
        run.write_table(f"probes/{name}", df)
    tables = {n: run.read_table(f"probes/{n}") for n in probes}
    run.write_table("bias/summary", summarize(run.read_table("generations"), {"clip": tables["clip"]},
                                              suite="occupations"))
    _memorization(run, gens, size)
    _provenance(run, gens)
    if stages:
        for stage in ("generate", "bias", "memorization", "provenance"):
            run.record_stage(stage, seconds=1.5)
    return run


def _memorization(run: Run, gens: pd.DataFrame, size: int) -> None:
    """Three matches (memorized, near duplicate, unconfirmed without evidence) and per-prompt rates."""
    from statsmodels.stats.proportion import proportion_confint

    picks = gens.iloc[[0, 1, 2]]
    rows = []
    for (verdict, hamming, l2, ssim), g in zip(
            [("memorized", 2, 0.031, 0.94), ("near_duplicate", 7, 0.12, 0.71), ("unconfirmed", 10, None, None)],
            picks.itertuples(), strict=True):
        key = f"laion-{g.Index:06d}"
        evidence = None
        if verdict != "unconfirmed":
            evidence = f"memorization/evidence/{key}.jpg"
            img = Image.open(run.path(g.path)).convert("RGB")
            run.path(evidence).parent.mkdir(parents=True, exist_ok=True)
            img.save(run.path(evidence), format="JPEG", quality=50)
        rows.append(dict(image_id=g.image_id, prompt_id=g.prompt_id, train_key=key,
                         train_uri=f"https://example.org/{key}.jpg", hamming=hamming, tile_l2=l2, ssim=ssim,
                         embedding_sim=None, verdict=verdict, evidence_path=evidence,
                         query_variant="full" if hamming < 10 else "crop90",  # the last found by a descriptor only
                         source="hash" if hamming < 10 else "descriptor:sscd-x",
                         descriptor_sim=None if hamming < 10 else 0.71,
                         alignment=None if hamming < 10 else "keypoints"))
    matches = pd.DataFrame(rows)
    run.write_table("memorization/matches", matches)
    confirmed = matches[matches["verdict"] != "unconfirmed"]
    per = gens.groupby(["prompt_id", "subject"]).size().rename("images").reset_index()
    per["matched"] = per["prompt_id"].map(confirmed.groupby("prompt_id").size()).fillna(0).astype("int64")
    per["rate"] = per["matched"] / per["images"]
    per["ci_low"], per["ci_high"] = proportion_confint(per["matched"], per["images"], method="wilson")
    run.write_table("memorization/rates", per)


def _provenance(run: Run, gens: pd.DataFrame) -> None:
    """Stamps with every status (copies of the images stand in for stamped files) and a robustness table."""
    statuses = [("Trusted", None), ("Valid", ["signingCredential.untrusted"]),
                ("Invalid", ["assertion.dataHash.mismatch"]), ("none", None)]
    rows = []
    for (status, codes), g in zip(statuses, gens.itertuples(), strict=False):
        stamped = f"provenance/stamped/{g.image_id}.png"
        run.path(stamped).parent.mkdir(parents=True, exist_ok=True)
        data = run.path(g.path).read_bytes()
        run.path(stamped).write_bytes(data)
        rows.append(dict(image_id=g.image_id, source_path=g.path, stamped_path=stamped, format="png",
                         watermark="dwtDctSvd", payload="a1b2c3d4", manifest_label=f"urn:c2pa:{g.Index:04d}",
                         sha256=sha256_bytes(data), phash="c3c3c3c3c3c3c3c3", status=status,
                         failure_codes=codes, seconds=0.02))
    run.write_table("provenance/stamps", pd.DataFrame(rows))
    attacks = ["jpeg_q90", "jpeg_q50", "resize_0.5", "crop_90", "rotate_5"]
    run.write_table("provenance/robustness", pd.DataFrame(dict(
        method="dwtDctSvd", attack=attacks, images=20, bit_accuracy=[0.99, 0.81, 0.93, 0.55, 0.52],
        detection_rate=[1.0, 0.6, 0.9, 0.1, 0.05], c2pa_survives=[0.0, 0.0, 0.0, 0.0, 0.0],
        credentials_recovered=[1.0, 0.9, 1.0, 0.8, 0.4])))


def build_runs_dir(root: Path, **kw) -> Path:
    """A runs root with two runs of the same suite: ``tiny-base`` and ``tiny-mitigated``."""
    build_run(root / "tiny-base", shares=BASE_SHARES, **kw)
    build_run(root / "tiny-mitigated", shares=MITIGATED_SHARES, **kw)
    return root


def build_evil_run(root: Path) -> Run:
    """A run whose tables point outside it: every page must refuse these paths, never open them."""
    run = Run.create(root, {"generation": {"suite": "occupations", "model": "evil"}})
    row = dict(image_id="plain-ceo-1", prompt_id="plain-ceo", suite="occupations", template="plain",
               subject="ceo", prompt="a photo of a ceo", negative_prompt="", mode="txt2img", index=0, seed=1,
               model="evil", scheduler="ddim", steps=2, guidance=7.5, width=64, height=64,
               path="../../../../../../etc/passwd", sha256="0" * 64, seconds=0.0)
    run.write_table("generations", pd.DataFrame([row]))
    run.write_table("probes/clip", pd.DataFrame([dict(
        image_id="plain-ceo-1", face_index=-1, attribute=gender_attribute(), label="woman", abstained=False,
        probe="clip", probe_version="1")]))
    from audit.stats import summarize

    run.write_table("bias/summary", summarize(run.read_table("generations"),
                                              {"clip": run.read_table("probes/clip")}, suite="occupations"))
    run.write_table("memorization/matches", pd.DataFrame([dict(
        image_id="plain-ceo-1", prompt_id="plain-ceo", train_key="k", hamming=1, verdict="memorized",
        train_uri="![x](http://example.org/x.png)", evidence_path="../../../../../../etc/passwd")]))
    run.write_table("provenance/stamps", pd.DataFrame([dict(
        image_id="plain-ceo-1", source_path="/etc/passwd", stamped_path="/etc/passwd", format="png",
        watermark="none", sha256="0" * 64, status="none", seconds=0.0)]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A table written behind the schema's back (no version): pages must report it, not crash.
    pq.write_table(pa.table({"method": ["x"]}), run.table_path("provenance/robustness"))
    return run


APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"


def open_app(runs_dir: Path, picked: list[str], monkeypatch):
    """A Streamlit AppTest of the dashboard on ``runs_dir`` with ``picked`` runs in ``?run=``, run once."""
    from streamlit.testing.v1 import AppTest

    from dashboard import RUNS_DIR_ENV

    monkeypatch.setenv(RUNS_DIR_ENV, str(runs_dir))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["run"] = picked
    at.run()
    return at
