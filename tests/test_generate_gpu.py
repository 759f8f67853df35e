"""The CUDA generation path (fp16, --compile), on the tiny model: skipped without a GPU (CI has none).

Each test prints the differences it measured, so that a GPU run (``pytest -m gpu -s``) reports them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffaudit.config import GenerationConfig
from diffaudit.runs import Run

pytestmark = pytest.mark.gpu


def suite(folder: Path, *, edits: bool) -> Path:
    from generate.sources import load_source

    folder.mkdir(parents=True, exist_ok=True)
    load_source("skimage:astronaut").resize((96, 96)).save(folder / "astro.png")
    mask = np.zeros((96, 96), np.uint8)
    mask[40:80, 40:80] = 255
    Image.fromarray(mask, "L").save(folder / "mask.png")
    text = textwrap.dedent("""\
        name: gpu_test
        description: the tiny model on CUDA
        sources: ["test"]
        templates:
          - {id: face, text: "a photo of the face of {a} {subject}"}
        subjects:
          - {id: nurse, text: nurse}
        """)
    if edits:
        text += textwrap.dedent("""\
            edits:
              - {id: astro, mode: img2img, prompt: "a photo of an astronaut", source: astro.png, strength: 0.5}
              - {id: patch, mode: inpaint, prompt: "a helmet", source: astro.png, mask: mask.png, strength: 1.0}
            """)
    (folder / "suite.yaml").write_text(text)
    return folder / "suite.yaml"


def pixels(run_dir: Path) -> dict[str, np.ndarray]:
    files = Run.open(run_dir).images().set_index("image_id")["file"]
    return {i: np.asarray(Image.open(f)).astype(int) for i, f in files.items()}


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[int, float]:
    assert sorted(a) == sorted(b)
    diffs = [np.abs(a[k] - b[k]) for k in a]
    return int(max(d.max() for d in diffs)), float(np.mean([d.mean() for d in diffs]))


def test_cuda_fp16_all_modes_and_batch_independence(tmp_path):
    """fp16 on CUDA: every mode gives images of the asked size, and batch 3 gives the images of batch 1
    (the same per-image noise; only kernel choice and rounding differ)."""
    from generate.models import load_pipelines
    from generate.runner import generate_run

    pipes = load_pipelines("tiny", device="cuda")
    assert str(pipes.dtype) == "torch.float16"
    cfg = dict(suite=str(suite(tmp_path / "s", edits=True)), model="tiny", images_per_prompt=3, steps=10,
               width=64, height=48, seed=3)
    for bs in (1, 3):
        generate_run(tmp_path / f"b{bs}", GenerationConfig(**cfg, batch_size=bs), progress=False, pipelines=pipes)
    one, three = pixels(tmp_path / "b1"), pixels(tmp_path / "b3")
    assert len(one) == 9 and all(p.shape == (48, 64, 3) for p in one.values())
    modes = set(Run.open(tmp_path / "b3").read_table("generations")["mode"])
    assert modes == {"txt2img", "img2img", "inpaint"}
    worst, mean = compare(one, three)
    print(f"\ncuda fp16 batch 1 vs 3: max {worst}/255, mean {mean:.4f}/255")
    assert worst <= 8 and mean <= 0.5


def test_compiled_runner_pads_short_batches_and_matches_eager(tmp_path):
    """--compile on CUDA: a short last batch is padded, so a run of 5 images at batch 4 compiles each model
    once and a second run reuses it; images agree with eager fp16 within a measured tolerance."""
    import torch

    from generate.models import load_pipelines
    from generate.runner import generate_run

    cfg = dict(suite=str(suite(tmp_path / "s", edits=False)), model="tiny", images_per_prompt=5, steps=10,
               width=64, height=64, seed=5, batch_size=4)
    eager = load_pipelines("tiny", device="cuda")
    generate_run(tmp_path / "eager", GenerationConfig(**cfg), progress=False, pipelines=eager)
    compiled = load_pipelines("tiny", device="cuda", compile_=True)
    assert compiled.compiled and compiled.info()["compile"] is True
    generate_run(tmp_path / "compiled", GenerationConfig(**cfg), progress=False, pipelines=compiled)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    generate_run(tmp_path / "again", GenerationConfig(**{**cfg, "seed": 6, "images_per_prompt": 3}), progress=False,
                 pipelines=compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # 3 images padded to 4: no recompile
    worst, mean = compare(pixels(tmp_path / "eager"), pixels(tmp_path / "compiled"))
    print(f"\ncompiled vs eager (fp16, fused QKV, channels-last): max {worst}/255, mean {mean:.4f}/255, "
          f"graphs {graphs}")
    assert worst <= 16 and mean <= 1.0
