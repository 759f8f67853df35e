"""Shared fixtures: offline, CPU, single-threaded. ``photo_run`` is a run folder whose "generated"
images are real photos that scikit-image ships (meaning matters offline: faces, skin, copies)."""

from __future__ import annotations

import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from diffaudit.runs import Run, sha256_bytes  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def skimage_photo(name: str, size: int | None = None) -> Image.Image:
    """A photo shipped with scikit-image as RGB, optionally resized to size x size."""
    import skimage.data

    img = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
    return img.resize((size, size), Image.BICUBIC) if size else img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_photo_run(root, photos=PHOTOS, size: int = 256, suite: str = "photos") -> Run:
    """A run whose images are real photos, with a valid generations table (no model involved)."""
    run = Run.create(root, {"generation": {"suite": suite, "model": "photos", "images_per_prompt": 1}})
    rows = []
    for i, name in enumerate(photos):
        data = png_bytes(skimage_photo(name, size))
        prompt_id, seed = f"photo-{name}", 1000 + i
        path = run.image_path(prompt_id, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows.append(dict(
            image_id=f"{prompt_id}-{seed}", prompt_id=prompt_id, suite=suite, template="photo", subject=name,
            prompt=f"a photo of {name}", negative_prompt="", mode="txt2img", index=0, seed=seed,
            model="photos", scheduler="none", steps=0, guidance=0.0, width=size, height=size,
            path=run.image_relpath(prompt_id, seed), sha256=sha256_bytes(data), seconds=0.0))
    run.write_table("generations", pd.DataFrame(rows))
    return run


@pytest.fixture
def photo_run(tmp_path) -> Run:
    return make_photo_run(tmp_path / "photo-run")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray with 2 CPUs for one test module (search actors closed before it shuts down)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        from audit.memorization.ray_engine import RaySearch

        RaySearch.close_all()
        ray.shutdown()


def wait_for_rows(child, run_dir, rows: int, timeout: float) -> None:
    """Poll until the child process has written ``rows`` generation rows into ``run_dir`` (it must still run)."""
    import time

    deadline = time.monotonic() + timeout
    seen = 0
    while seen < rows:
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "child made no progress"
        time.sleep(0.1)
        if (run_dir / "generations.parquet").is_file():
            seen = len(Run.open(run_dir).read_table("generations"))
