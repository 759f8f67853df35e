"""Generation on the tiny offline pipelines: modes and sizes, batch independence, kill-and-resume, bad input.

The tiny model is built once into the user cache (``generate.tiny``); on an empty cache the first test
pays for that build (about a minute on one core), later runs reuse it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from conftest import wait_for_rows
from PIL import Image

from diffaudit.config import GenerationConfig
from diffaudit.errors import ConfigError, InputError, ModelError, NotARunError, RunLockedError, SuiteError
from diffaudit.runs import Run, sha256_file
from generate import runner, tiny
from generate.models import Pipelines, load_pipelines, wrap_pipeline
from generate.runner import generate_run, plan_run
from generate.sources import load_source

ROOT = Path(__file__).resolve().parents[1]
# Max per-pixel difference (0-255) between an image generated in a batch of 1 and in a batch of 3 on CPU
# fp32. Measured here: max 1 (mean 1e-5 to 4e-5 per pixel; 10 of 12 PNGs bit-identical) at 48x32 and 64x64.
BATCH_TOLERANCE = 2


@pytest.fixture(scope="session")
def pipes() -> Pipelines:
    import torch

    torch.set_num_threads(1)
    return load_pipelines("tiny")


def write_suite(folder: Path, *, mask_size: tuple[int, int] | None = None, strength: float = 0.5,
                source: str = "astro.png") -> Path:
    """A small suite with all three modes; sources are files beside it (a path source, a path mask)."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = load_source("skimage:astronaut").resize((96, 96))
    photo.save(folder / "astro.png")
    mask = np.zeros((96, 96) if mask_size is None else mask_size[::-1], np.uint8)
    mask[40:80, 40:80] = 255
    Image.fromarray(mask, "L").save(folder / "mask.png")
    path = folder / "suite.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: tiny_test
        description: three modes on the tiny model
        sources: ["test"]
        templates:
          - {{id: face, text: "a photo of the face of {{a}} {{subject}}"}}
        subjects:
          - {{id: nurse, text: nurse}}
          - {{id: pilot, text: pilot}}
        edits:
          - {{id: astro, mode: img2img, prompt: "a photo of an astronaut", source: {source}, strength: {strength}}}
          - {{id: patch, mode: inpaint, prompt: "a helmet", source: astro.png, mask: mask.png, strength: 1.0}}
        """))
    return path


def config(suite: Path, **kw) -> GenerationConfig:
    base = dict(suite=str(suite), model="tiny", images_per_prompt=2, steps=2, width=48, height=32, seed=7,
                batch_size=3)
    return GenerationConfig(**{**base, **kw})


def expected_ids(cfg: GenerationConfig) -> set[str]:
    from prompts.suites import expand

    reqs = expand(cfg.suite, images_per_prompt=cfg.images_per_prompt, seed=cfg.seed, templates=cfg.templates,
                  subjects=cfg.subjects, edits=cfg.edits)
    return {r.image_id(s) for r in reqs for s in r.seeds}


def assert_valid_run(run: Run, cfg: GenerationConfig) -> pd.DataFrame:
    gens = run.read_table("generations")
    assert not gens["image_id"].duplicated().any()
    assert set(gens["image_id"]) == expected_ids(cfg)
    for rel, digest in zip(gens["path"], gens["sha256"], strict=True):
        assert sha256_file(run.path(rel)) == digest
    files = {p.relative_to(run.root).as_posix() for p in run.root.glob("images/*/*")}
    assert files == set(gens["path"])  # no stray files, no leftover temp files
    return gens


def test_three_modes_give_images_of_the_right_size(tmp_path, pipes):
    cfg = config(write_suite(tmp_path / "suite"))
    summary = generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)
    run = Run.open(tmp_path / "run")
    gens = assert_valid_run(run, cfg)
    assert summary["generated"] == len(gens) == 8 and summary["skipped"] == 0
    assert sorted(gens["mode"].unique()) == ["img2img", "inpaint", "txt2img"]
    for f in run.images()["file"]:
        with Image.open(f) as im:
            assert (im.size, im.mode) == ((48, 32), "RGB")
    pixels = {i: np.asarray(Image.open(f)) for i, f in zip(gens["image_id"], run.images()["file"], strict=True)}
    assert len({p.tobytes() for p in pixels.values()}) == len(pixels)  # every seed gives its own image
    info = run.info
    assert info["generation"]["model_revision"].startswith(f"tiny-v{tiny.VERSION}:sha256:")
    assert info["generation"]["steps"] == 2 and info["generation"]["scheduler"] == "ddim"
    assert info["stages"]["generate"]["generated"] == 8
    assert gens["nsfw"].isna().all()  # the tiny model has no safety checker: null, not False


def test_same_noise_and_same_images_at_batch_sizes_1_and_3(tmp_path, pipes, monkeypatch):
    suite = write_suite(tmp_path / "suite")
    noise: dict[int, dict[int, object]] = {1: {}, 3: {}}
    original = runner.initial_noise

    for bs in (1, 3):
        def recording(generators, shape, dtype, bs=bs):
            out = original(generators, shape, dtype)
            for g, row in zip(generators, out, strict=True):
                noise[bs][g.initial_seed()] = row.clone()
            return out

        monkeypatch.setattr(runner, "initial_noise", recording)
        cfg = config(suite, images_per_prompt=3, batch_size=bs)
        generate_run(tmp_path / f"run{bs}", cfg, progress=False, pipelines=pipes)
    assert noise[1].keys() == noise[3].keys() and len(noise[1]) == 6
    for seed in noise[1]:
        assert (noise[1][seed] == noise[3][seed]).all()
    one, three = (Run.open(tmp_path / f"run{bs}").images().set_index("image_id") for bs in (1, 3))
    assert set(one.index) == set(three.index) and len(one) == 12
    for image_id in one.index:  # all modes, including img2img/inpaint noise drawn from per-image generators
        a = np.asarray(Image.open(one.loc[image_id, "file"])).astype(int)
        b = np.asarray(Image.open(three.loc[image_id, "file"])).astype(int)
        assert np.abs(a - b).max() <= BATCH_TOLERANCE, image_id


CHILD = """
import json, sys, time
import torch
torch.set_num_threads(1)
import generate.runner as R
from diffaudit.config import GenerationConfig
R.ROW_FLUSH_SECONDS = 0  # record every batch, so the kill lands between recorded batches
call = R._Generator._call
def slow(self, batch):  # a slow model, so the parent can kill it mid-way
    time.sleep(0.3)
    return call(self, batch)
R._Generator._call = slow
R.generate_run(sys.argv[1], GenerationConfig(**json.loads(sys.argv[2])), progress=False)
"""


def test_killed_run_resumes_to_exactly_the_expected_set(tmp_path, pipes):
    cfg = config(write_suite(tmp_path / "suite"), images_per_prompt=3, batch_size=1)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out), cfg.model_dump_json()], env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_rows(child, out, 3, timeout=180)
        with pytest.raises(RunLockedError):  # a second generate on the same run while the first runs
            generate_run(out, cfg, progress=False, pipelines=pipes)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    before = set(Run.open(out).read_table("generations")["image_id"])
    assert 3 <= len(before) < 12
    summary = generate_run(out, cfg, progress=False, pipelines=pipes)
    assert summary["skipped"] == len(before) and summary["generated"] == 12 - len(before)
    assert_valid_run(Run.open(out), cfg)
    again = generate_run(out, cfg, progress=False, pipelines=pipes)  # nothing left: nothing regenerated
    assert again["generated"] == 0 and again["skipped"] == 12


def test_img2img_at_low_strength_keeps_the_photo(tmp_path, pipes):
    """What the demo's memorization check relies on: the fitted tiny VAE round-trips a held-out photo."""
    assert "astronaut" in tiny.HELD_OUT
    suite = tmp_path / "edit.yaml"
    suite.write_text(textwrap.dedent("""\
        name: edit
        description: the demo's astronaut edit
        sources: ["test"]
        edits:
          - {id: astronaut, mode: img2img, prompt: "a photo of an astronaut", source: "skimage:astronaut", strength: 0.1}
        """))
    cfg = GenerationConfig(suite=str(suite), model="tiny", images_per_prompt=2, seed=0)
    generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)
    source = load_source("skimage:astronaut")
    for f in Run.open(tmp_path / "run").images()["file"]:
        out = Image.open(f).convert("RGB")
        assert out.size == (tiny.SIZE, tiny.SIZE)
        distance = imagehash.phash(out.resize(source.size, Image.BICUBIC)) - imagehash.phash(source)
        assert distance <= 10  # measured: 2


def test_tokenizer_matches_open_clip():
    import open_clip

    tok = tiny.clip_tokenizer()
    for text in ("a photo of the face of a CEO", "an air-conditioning installer, 2022!"):
        ids = tok(text, padding="max_length", max_length=77).input_ids
        ref = open_clip.tokenize([text])[0].tolist()
        n = ref.index(49407) + 1
        assert ids[:n] == ref[:n]


def test_tiny_cache_is_built_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFAUDIT_CACHE", str(tmp_path))

    def broken(folder, progress):
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(tiny, "_build", broken)
    with pytest.raises(RuntimeError):
        tiny.ensure_tiny()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    tiny.tiny_dir().mkdir()  # a folder without its marker (e.g. copied half-way) is not trusted
    monkeypatch.setattr(tiny, "_build", lambda folder, progress: (folder / tiny.MARKER).write_text("{}"))
    assert (tiny.ensure_tiny() / tiny.MARKER).is_file()


# --- bad input: one-line error, nothing written --------------------------------------------------

def test_unknown_hub_model_offline_fails_fast_and_says_what_to_do(tmp_path):
    start = time.monotonic()
    with pytest.raises(ModelError) as e:
        generate_run(tmp_path / "run", GenerationConfig(model="nobody/no-such-model-xyz"), progress=False)
    assert time.monotonic() - start < 60
    assert "HF_HUB_OFFLINE" in str(e.value) and "local" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ModelError, match="not found"):
        generate_run(tmp_path / "run", GenerationConfig(model="./missing/model.safetensors"), progress=False)


@pytest.mark.parametrize("case", ["missing_source", "mask_size", "strength_steps", "not_a_run", "a_file",
                                  "unsupported"])
def test_bad_input_writes_nothing(tmp_path, pipes, case):
    out = tmp_path / "run"
    if case == "missing_source":
        suite = write_suite(tmp_path / "s", source="gone.png")
        err, cfg = SuiteError, config(suite)
    elif case == "mask_size":
        err, cfg = InputError, config(write_suite(tmp_path / "s", mask_size=(64, 96)))
    elif case == "strength_steps":
        err, cfg = InputError, config(write_suite(tmp_path / "s", strength=0.1), steps=5)
    elif case == "not_a_run":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        err, cfg = NotARunError, config(write_suite(tmp_path / "s"))
    elif case == "a_file":
        out.write_text("mine")
        err, cfg = NotARunError, config(write_suite(tmp_path / "s"))
    else:  # a pipeline family without an img2img variant
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

        unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                           down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
        pipes = Pipelines(spec="ddpm", kind="folder", txt2img=DDPMPipeline(unet, DDPMScheduler()), device="cpu",
                          dtype=pipes.dtype, revision=None, scheduler="ddpm", default_steps=2,
                          default_guidance=0.0, default_size=(32, 32), safety_policy="unavailable")
        err, cfg = ModelError, config(write_suite(tmp_path / "s"))
    with pytest.raises(err):
        generate_run(out, cfg, progress=False, pipelines=pipes)
    if case == "not_a_run":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    elif case == "a_file":
        assert out.read_text() == "mine"
    else:
        assert not out.exists()


def test_resume_with_other_settings_is_refused(tmp_path, pipes):
    cfg = config(write_suite(tmp_path / "s"), images_per_prompt=1)
    generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)
    table = (tmp_path / "run" / "generations.parquet").read_bytes()
    with pytest.raises(ConfigError, match="steps"):
        plan_run(tmp_path / "run", cfg.model_copy(update={"steps": 3}), pipelines=pipes)
    assert (tmp_path / "run" / "generations.parquet").read_bytes() == table


def test_a_run_that_made_no_image_yet_takes_new_settings(tmp_path, pipes, monkeypatch):
    """run.json written, then the first batch ran out of memory at batch 1 (as a too-large --size does on a
    GPU): no image to keep consistent, so a retry with another size and steps is accepted, and run.json holds
    the retry's settings, not a merge with the failed attempt's."""
    import torch

    def out_of_memory(self, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    cfg = config(write_suite(tmp_path / "s"), images_per_prompt=1, edits=(), batch_size=1, width=64, height=64)
    with monkeypatch.context() as m:
        m.setattr(runner._Generator, "_call", out_of_memory)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)
    run = Run.open(tmp_path / "run")
    assert run.info["generation"]["width"] == 64 and run.read_table("generations").empty
    retry = cfg.model_copy(update={"width": 48, "height": 32, "steps": 3})
    assert plan_run(tmp_path / "run", retry, pipelines=pipes).fresh
    summary = generate_run(tmp_path / "run", retry, progress=False, pipelines=pipes)
    assert summary["generated"] == 2
    gen = run.info["generation"]
    assert (gen["width"], gen["height"], gen["steps"]) == (48, 32, 3)
    assert gen["memorization_score"]["latent_shape"] == [4, 16, 24]  # replaced whole, not merged
    gens = assert_valid_run(run, retry)
    assert set(zip(gens["width"], gens["height"], gens["steps"], strict=True)) == {(48, 32, 3)}
    # Now it holds images: other settings are refused again.
    assert not plan_run(tmp_path / "run", retry, pipelines=pipes).fresh
    with pytest.raises(ConfigError, match="width"):
        plan_run(tmp_path / "run", cfg, pipelines=pipes)


def test_resume_regenerates_images_whose_suite_entry_was_edited(tmp_path, pipes):
    suite = write_suite(tmp_path / "s")
    cfg = config(suite, images_per_prompt=1, edits=("astro",))
    generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)
    text = suite.read_text()
    suite.write_text(text.replace("text: nurse", "text: firefighter").replace("strength: 0.5", "strength: 0.6"))
    summary = generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)
    assert summary["generated"] == 2 and summary["skipped"] == 1  # the pilot is unchanged
    gens = assert_valid_run(Run.open(tmp_path / "run"), cfg).set_index("prompt_id")
    assert gens.loc["face-nurse", "prompt"] == "a photo of the face of a firefighter"
    assert gens.loc["img2img-astro", "strength"] == 0.6
    again = generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)
    assert again["generated"] == 0 and again["skipped"] == 3


def test_resume_compares_the_suite_file_not_the_spelling(tmp_path, pipes, monkeypatch):
    suite = write_suite(tmp_path / "s")
    cfg = config(suite, images_per_prompt=1, subjects=("nurse",), edits=())
    generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)
    monkeypatch.chdir(tmp_path / "s")
    plan_run(tmp_path / "run", cfg.model_copy(update={"suite": "./suite.yaml"}), pipelines=pipes)
    (tmp_path / "other.yaml").write_text(suite.read_text().replace("astro.png", "s/astro.png")
                                         .replace("mask.png", "s/mask.png"))
    with pytest.raises(ConfigError, match="suite_file"):
        plan_run(tmp_path / "run", cfg.model_copy(update={"suite": str(tmp_path / "other.yaml")}), pipelines=pipes)


def cli(*args: str) -> None:
    import diffaudit.commands.generate  # noqa: F401  (until diffaudit/cli.py imports it)
    from diffaudit.cli import main

    try:
        main(list(args))
    except SystemExit as e:  # typer exits 0 on success; errors (code 2) go to the caller
        if e.code:
            raise


@pytest.mark.parametrize("args, message", [
    (["--size", "60"], "--size: must be a multiple of 8"),
    (["--size", "big"], "--size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--suite", "no_such_suite"], "unknown suite"),
    (["--scheduler", "nope"], "unknown scheduler"),
    (["--model", "nobody/no-such-model-xyz"], "HF_HUB_OFFLINE"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    base = {"--suite": "demo", "--out": str(tmp_path / "run")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    with pytest.raises(SystemExit) as e:
        cli("generate", *[x for kv in base.items() for x in kv], "--no-progress")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_cli_generates_and_resumes(tmp_path, capsys):
    suite = write_suite(tmp_path / "s")
    args = ["generate", "--suite", str(suite), "--out", str(tmp_path / "run"), "-n", "1", "--steps", "2",
            "--size", "32", "--batch-size", "4", "--no-progress"]
    cli(*args)
    assert "4 images generated, 0 already done" in capsys.readouterr().out
    cli(*args)
    assert "0 images generated, 4 already done" in capsys.readouterr().out
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["generation"]["width"], info["generation"]["height"]) == (32, 32)


def test_local_diffusers_folder_runs_all_modes_through_from_pipe(tmp_path):
    """A local folder loads through the AutoPipeline families; img2img/inpaint share its weights."""
    folder = tiny.ensure_tiny() / "base"
    pipes = load_pipelines(str(folder))
    assert pipes.kind == "folder" and pipes.revision.startswith("sha256:") and pipes.default_size == (64, 64)
    cfg = config(write_suite(tmp_path / "s"), model=str(folder), images_per_prompt=1, width=32, height=32)
    generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)
    assert pipes.for_mode("inpaint").unet is pipes.txt2img.unet  # 4-channel UNet, shared, not reloaded
    assert pipes.for_mode("img2img").vae is pipes.txt2img.vae
    assert_valid_run(Run.open(tmp_path / "run"), cfg)


def test_unreadable_checkpoint_is_a_model_error(tmp_path):
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load_pipelines(str(junk))
    with pytest.raises(ModelError, match="model_index.json"):
        load_pipelines(str(tmp_path))


@pytest.mark.parametrize("policy", ["flag", "off"])
def test_safety_checker_flags_instead_of_blacking_out(tmp_path, policy):
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    clip = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                       num_attention_heads=4),
                      vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=4, image_size=32, patch_size=8),
                      projection_dim=32)
    checker = StableDiffusionSafetyChecker(clip).eval()
    checker.concept_embeds_weights.data.fill_(-2.0)  # every image crosses the threshold
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny.ensure_tiny() / "base", safety_checker=checker, requires_safety_checker=True,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    pipes = wrap_pipeline(pipe, spec="tiny+checker", kind="folder", revision=None, steps=2, guidance=5.0,
                          device="cpu", dtype=pipe.unet.dtype, safety_checker=policy)
    assert pipe.safety_checker is None  # detached: the pipeline itself never blacks an image out
    suite = write_suite(tmp_path / "s")
    cfg = config(suite, model="tiny+checker", images_per_prompt=1, safety_checker=policy, subjects=("nurse",),
                 edits=())
    generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)
    run = Run.open(tmp_path / "run")
    gens = run.images()
    assert run.info["generation"]["safety_checker"] == policy
    if policy == "flag":
        assert gens["nsfw"].tolist() == [True]
    else:
        assert gens["nsfw"].isna().all()
    assert np.asarray(Image.open(gens["file"][0])).max() > 0  # not blacked out


def test_compile_is_recorded_only_where_it_happens(tmp_path, pipes):
    """--compile is a CUDA speed-up; on the CPU nothing is compiled, so run.json must not claim it was."""
    cpu = wrap_pipeline(pipes.txt2img, spec="tiny", kind="tiny", revision=pipes.revision, steps=2, guidance=5.0,
                        device="cpu", dtype=pipes.dtype, compile_=True)
    assert cpu.info()["compile"] is False and not cpu.compiled
    cfg = config(write_suite(tmp_path / "s"), images_per_prompt=1, subjects=("nurse",), edits=(), compile=True)
    generate_run(tmp_path / "run", cfg, progress=False, pipelines=cpu)
    assert Run.open(tmp_path / "run").info["generation"]["compile"] is False


def test_out_of_memory_halves_the_batch_and_goes_on(tmp_path, pipes, monkeypatch):
    """CUDA OOM is simulated on the CPU: batches above 2 images raise it; the run finishes at batch 2.
    The retry runs after the handler, so the failed batch's frames and tensors are freed first."""
    import torch

    call = runner._Generator._call
    sizes, handling, made = [], [], []

    def oom_above_two(self, batch):
        sizes.append(len(batch))
        handling.append(sys.exc_info()[0])  # set while inside an ``except`` block
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        made.extend(j.image_id for j in batch)
        return call(self, batch)

    monkeypatch.setattr(runner._Generator, "_call", oom_above_two)
    cfg = config(write_suite(tmp_path / "s"), images_per_prompt=3, batch_size=4, edits=())
    summary = generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)
    assert sizes[0] == 4 and max(sizes[1:]) == 2 and summary["batch_size"] == 2
    assert handling == [None] * len(sizes)  # no retry ran inside the OOM handler
    assert sorted(made) == sorted(expected_ids(cfg)) and summary["generated"] == 6  # each image exactly once
    assert_valid_run(Run.open(tmp_path / "run"), cfg)


def test_compiled_model_gets_full_batches_only(tmp_path, pipes, monkeypatch):
    """A compiled model recompiles (about a minute) for every new batch shape, so the runner pads a short
    last batch to the full size and drops the padding. Simulated on the CPU by marking the pipelines
    compiled: every call must get the full batch, and the images must equal an unpadded run's."""
    from dataclasses import replace

    call = runner._Generator._call
    sizes: list[int] = []

    def recording(self, batch):
        sizes.append(len(batch))
        return call(self, batch)

    monkeypatch.setattr(runner._Generator, "_call", recording)
    cfg = config(write_suite(tmp_path / "s"), images_per_prompt=5, subjects=("nurse",), edits=(), batch_size=4)
    generate_run(tmp_path / "padded", cfg, progress=False, pipelines=replace(pipes, compiled=True))
    assert sizes and set(sizes) == {4}  # 5 images per group: a full batch, then 1 image padded to 4
    sizes.clear()
    generate_run(tmp_path / "plain", cfg, progress=False, pipelines=pipes)
    assert sizes == [4, 1]  # without compile: a full batch, then the short one as it is (not padded)
    padded, plain = (Run.open(tmp_path / d).images().set_index("image_id")["file"] for d in ("padded", "plain"))
    assert sorted(padded.index) == sorted(plain.index) == sorted(expected_ids(cfg))
    for image_id in plain.index:
        diff = np.abs(np.asarray(Image.open(padded[image_id])).astype(int)
                      - np.asarray(Image.open(plain[image_id])).astype(int))
        assert diff.max() <= 2, image_id  # the same per-image noise; batch size changes fp rounding only


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_initial_noise_is_what_diffusers_draws_for_the_same_generators(dtype):
    """A seed must give the image a plain diffusers call with ``generator=[torch.Generator('cpu')...]`` gives:
    diffusers draws each image's noise in the model's dtype (on torch 2.11 a float16 draw is not a rounded float32
    one: the SD 1.5 bench on an H100 gave entirely different images until the runner drew as diffusers does)."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    dt = getattr(torch, dtype)
    ours = runner.initial_noise([torch.Generator("cpu").manual_seed(s) for s in (3, 4, 5)], (4, 16, 16), dt)
    theirs = randn_tensor((3, 4, 16, 16), generator=[torch.Generator("cpu").manual_seed(s) for s in (3, 4, 5)],
                          device=torch.device("cpu"), dtype=dt)
    assert ours.dtype == dt and torch.equal(ours, theirs)


def test_no_progress_reaches_the_tiny_model_build(tmp_path, pipes, monkeypatch):
    """`generate --no-progress` showed the tiny VAE's fitting bar on first use: the flag must reach it."""
    seen = []
    real = tiny.ensure_tiny

    def recording(progress=False):
        seen.append(progress)
        return real(progress=False)

    monkeypatch.setattr(tiny, "ensure_tiny", recording)
    cfg = config(write_suite(tmp_path / "s"), images_per_prompt=1, subjects=("nurse",), edits=())
    generate_run(tmp_path / "run", cfg, progress=False)
    assert seen == [False]
