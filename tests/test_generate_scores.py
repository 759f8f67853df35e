"""Wen et al.'s memorization score recorded while generating, on the tiny model.

On the tiny model (random weights) the score says nothing about memorization: these tests prove the
plumbing only. The score must be exactly what the two noise predictions give, in every mode, whatever
the batch size, and survive a resume; images without CFG or with a negative prompt get none.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_generate import config, write_suite

from diffaudit import schema
from diffaudit.runs import Run
from generate import runner
from generate.models import Pipelines, load_pipelines
from generate.runner import generate_run
from generate.scores import MEAN_STEPS, ScoreRecorder, Scores, text_noise_norm

SCORE_RTOL = 1e-4  # fp32 on the CPU: a batch of 2n vs two batches of n round differently, by ~1e-6 relative


@pytest.fixture(scope="module")
def pipes() -> Pipelines:
    import torch

    torch.set_num_threads(1)
    return load_pipelines("tiny")


def scores_by_image(run_dir) -> pd.DataFrame:
    return Run.open(run_dir).read_table("generations").set_index("image_id")


def test_txt2img_score_is_the_norm_of_the_two_noise_predictions(tmp_path, pipes):
    """Computed again from scratch: the seed's initial noise, the prompt's and the empty prompt's embeddings,
    two separate UNet calls at the first timestep, the L2 norm of their difference."""
    import torch

    cfg = config(write_suite(tmp_path / "s"), images_per_prompt=2, edits=(), steps=4)
    generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)
    gens = scores_by_image(tmp_path / "run")
    pipe = pipes.txt2img
    assert gens["mem_score_steps"].tolist() == [4] * 4  # 4 steps < MEAN_STEPS: all of them
    for image_id, row in gens.iterrows():
        gen = torch.Generator("cpu").manual_seed(int(row["seed"]))
        x = runner.initial_noise([gen], (4, 32 // 2, 48 // 2), torch.float32)
        pipe.scheduler.set_timesteps(4)
        t = pipe.scheduler.timesteps[0]
        x = pipe.scheduler.scale_model_input(x * pipe.scheduler.init_noise_sigma, t)
        with torch.no_grad():
            text, empty = pipe.encode_prompt(row["prompt"], "cpu", 1, True, negative_prompt="")
            eps_text = pipe.unet(x, t, encoder_hidden_states=text).sample
            eps_empty = pipe.unet(x, t, encoder_hidden_states=empty).sample
        direct = float(torch.linalg.vector_norm(eps_text - eps_empty))
        assert direct > 0
        assert row["mem_score_step1"] == pytest.approx(direct, rel=SCORE_RTOL), image_id


class Capture:
    """Records every UNet call's input and output, to recompute the score from the halves it saw."""

    def __init__(self, unet):
        self.calls: list[tuple] = []
        self.handle = unet.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        self.calls.append((sample.shape[0], output[0] if isinstance(output, tuple) else output.sample))


def test_all_three_modes_record_the_score_of_their_own_unet_calls(tmp_path, pipes):
    assert pipes.for_mode("img2img").unet is pipes.txt2img.unet  # shared weights (from_pipe)
    assert pipes.for_mode("inpaint").unet is not pipes.txt2img.unet  # the tiny 9-channel inpainting UNet
    shared, inpaint = Capture(pipes.txt2img.unet), Capture(pipes.for_mode("inpaint").unet)
    try:
        cfg = config(write_suite(tmp_path / "s"), images_per_prompt=1, steps=4, batch_size=4)
        generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)
    finally:
        shared.handle.remove()
        inpaint.handle.remove()
    gens = scores_by_image(tmp_path / "run")
    assert sorted(gens["mode"].unique()) == ["img2img", "inpaint", "txt2img"]
    assert gens["mem_score_step1"].notna().all() and (gens["mem_score_step1"] > 0).all()
    # One batch per mode, in suite order: txt2img (4 steps), img2img at strength 0.5 (int(4 * 0.5) = 2 steps)
    # on the shared UNet; inpainting at strength 1.0 (4 steps) on its own.
    calls = {"txt2img": shared.calls[:4], "img2img": shared.calls[4:], "inpaint": inpaint.calls}
    assert [len(c) for c in calls.values()] == [4, 2, 4]
    for mode, mode_calls in calls.items():
        rows = gens[gens["mode"] == mode].sort_values("prompt_id")
        assert {batch for batch, _ in mode_calls} == {2 * len(rows)}  # CFG: [uncond; text]
        per_step = [text_noise_norm(*eps.chunk(2)).numpy() for _, eps in mode_calls]
        np.testing.assert_allclose(rows["mem_score_step1"], per_step[0], rtol=1e-6)
        np.testing.assert_allclose(rows["mem_score_mean"], np.mean(per_step[:MEAN_STEPS], axis=0), rtol=1e-6)
        assert set(rows["mem_score_steps"]) == {len(mode_calls)}


def test_batch_size_does_not_change_the_score(tmp_path, pipes):
    suite = write_suite(tmp_path / "s")
    for bs in (1, 3):
        generate_run(tmp_path / f"b{bs}", config(suite, images_per_prompt=3, batch_size=bs, steps=3),
                     progress=False, pipelines=pipes)
    one, three = scores_by_image(tmp_path / "b1"), scores_by_image(tmp_path / "b3")
    assert len(one) == 12 and one["mem_score_step1"].notna().all()
    for col in ("mem_score_step1", "mem_score_mean"):
        np.testing.assert_allclose(three.loc[one.index, col], one[col], rtol=SCORE_RTOL)


def test_padded_batches_keep_each_image_its_own_score(tmp_path, pipes):
    """A compiled model pads a short batch with copies of its last job; the padding's scores are dropped."""
    from dataclasses import replace

    cfg = config(write_suite(tmp_path / "s"), images_per_prompt=5, subjects=("nurse",), edits=(), batch_size=4)
    generate_run(tmp_path / "padded", cfg, progress=False, pipelines=replace(pipes, compiled=True))
    generate_run(tmp_path / "plain", cfg, progress=False, pipelines=pipes)
    padded, plain = scores_by_image(tmp_path / "padded"), scores_by_image(tmp_path / "plain")
    np.testing.assert_allclose(padded.loc[plain.index, "mem_score_step1"], plain["mem_score_step1"], rtol=SCORE_RTOL)


def test_resume_keeps_scores_and_scores_what_it_makes(tmp_path, pipes):
    cfg = config(write_suite(tmp_path / "s"), images_per_prompt=2, steps=3)
    generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)
    run = Run.open(tmp_path / "run")
    first = scores_by_image(tmp_path / "run")
    gone = first.index[:3]
    for image_id in gone:  # lost files are made again on resume; the others are kept as recorded
        run.path(first.loc[image_id, "path"]).unlink()
    summary = generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)
    assert summary["generated"] == 3 and summary["skipped"] == 5
    again = scores_by_image(tmp_path / "run")
    assert again["mem_score_step1"].notna().all()
    kept = first.index.difference(gone)
    assert (again.loc[kept, "mem_score_step1"] == first.loc[kept, "mem_score_step1"]).all()  # not recomputed
    np.testing.assert_allclose(again.loc[gone, "mem_score_step1"], first.loc[gone, "mem_score_step1"],
                               rtol=SCORE_RTOL)


def test_out_of_memory_halving_keeps_the_scores(tmp_path, pipes, monkeypatch):
    import torch

    call = runner._Generator._call

    def oom_above_two(self, batch):
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return call(self, batch)

    cfg = config(write_suite(tmp_path / "s"), images_per_prompt=3, batch_size=4, edits=(), steps=3)
    generate_run(tmp_path / "plain", cfg.model_copy(update={"batch_size": 2}), progress=False, pipelines=pipes)
    monkeypatch.setattr(runner._Generator, "_call", oom_above_two)
    generate_run(tmp_path / "halved", cfg, progress=False, pipelines=pipes)
    plain, halved = scores_by_image(tmp_path / "plain"), scores_by_image(tmp_path / "halved")
    np.testing.assert_allclose(halved.loc[plain.index, "mem_score_step1"], plain["mem_score_step1"], rtol=SCORE_RTOL)
    np.testing.assert_allclose(halved.loc[plain.index, "mem_score_mean"], plain["mem_score_mean"], rtol=SCORE_RTOL)


def test_no_score_without_guidance_or_with_a_negative_prompt(tmp_path, pipes):
    suite = tmp_path / "neg.yaml"
    suite.write_text(textwrap.dedent("""\
        name: neg
        description: one prompt with a negative prompt, one without
        sources: ["test"]
        edits:
          - {id: plain, mode: img2img, prompt: "a cat", source: "skimage:astronaut", strength: 1.0}
          - {id: neg, mode: img2img, prompt: "a cat", negative_prompt: "blurry", source: "skimage:astronaut",
             strength: 1.0}
        """))
    generate_run(tmp_path / "cfg", config(suite, steps=2, images_per_prompt=1), progress=False, pipelines=pipes)
    gens = Run.open(tmp_path / "cfg").read_table("generations").set_index("prompt_id")
    assert gens.loc["img2img-plain", "mem_score_step1"] > 0
    assert pd.isna(gens.loc["img2img-neg", "mem_score_step1"]) and pd.isna(gens.loc["img2img-neg", "mem_score_steps"])
    generate_run(tmp_path / "nocfg", config(suite, steps=2, images_per_prompt=1, guidance=1.0), progress=False,
                 pipelines=pipes)
    assert Run.open(tmp_path / "nocfg").read_table("generations")["mem_score_step1"].isna().all()


def test_a_run_written_before_the_score_columns_still_reads(tmp_path, pipes):
    cfg = config(write_suite(tmp_path / "s"), images_per_prompt=1, edits=(), steps=2)
    generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)
    path = tmp_path / "run" / "generations.parquet"
    table = pq.read_table(path)
    old = table.drop_columns(["mem_score_step1", "mem_score_mean", "mem_score_steps"])
    pq.write_table(old.replace_schema_metadata(table.schema.metadata), path)
    gens = Run.open(tmp_path / "run").read_table("generations")
    assert len(gens) == 2 and gens["mem_score_step1"].isna().all()
    assert list(gens.columns) == schema.GENERATIONS.names
    summary = generate_run(tmp_path / "run", cfg, progress=False, pipelines=pipes)  # resumes, keeps the rows
    assert summary["skipped"] == 2


def test_scores_select_and_concatenate_like_the_batch():
    norms = np.array([[1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0]])
    s = Scores(norms, np.array([True, True, False, True]))
    assert [r["mem_score_step1"] for r in s.rows()] == [1.0, 2.0, None, 4.0]
    assert [r["mem_score_mean"] for r in s[1:].rows()] == [3.0, None, 5.0]
    assert [r["mem_score_step1"] for r in s[:3][1:].rows()] == [2.0, None]
    joined = Scores.concat([s[:2], Scores.none(1), s[3:]])
    assert [r["mem_score_step1"] for r in joined.rows()] == [1.0, 2.0, None, 4.0]
    assert {r["mem_score_steps"] for r in joined.rows()} == {2, None}


def test_recorder_skips_calls_without_both_halves():
    import torch

    class Net(torch.nn.Module):
        def forward(self, x):
            return (x * 2,)

    net = Net()
    with ScoreRecorder(net, 2, mean_steps=2) as rec:
        net(torch.ones(2, 1, 2, 2))  # a batch of n, not 2n: no CFG, nothing recorded
        net(torch.cat([torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)]))
        net(torch.cat([torch.zeros(2, 1, 2, 2), 3 * torch.ones(2, 1, 2, 2)]))
        net(torch.cat([torch.zeros(2, 1, 2, 2), 100 * torch.ones(2, 1, 2, 2)]))  # past mean_steps
    assert not net._forward_hooks  # removed on exit
    step1, mean = rec.scores().values()
    np.testing.assert_allclose(step1, [4.0, 4.0])  # || 2 * 1 - 0 || over 4 elements
    np.testing.assert_allclose(mean, [8.0, 8.0])
    assert rec.calls == 4
    assert pa.types.is_float64(schema.GENERATIONS.field("mem_score_step1").type)


def test_a_run_gives_the_unet_its_own_forward_back(tmp_path, pipes, monkeypatch):
    """The CUDA-graph wrapper (stood in for by a pass-through one: no GPU here) is removed when a run ends, so a
    second run on the same pipelines (a benchmark's warm-up then timed run) wraps the plain UNet once, not the
    first run's wrapper again: every UNet call goes through exactly one wrapper, and scores are unchanged."""
    from generate import fast

    seen: list[int] = []

    class PassThrough(fast.GraphedUNet):
        def install(self):
            self._eager = self.unet.forward
            self.unet.forward = self.forward
            return self

        def forward(self, *args, **kwargs):
            seen.append(id(self))
            return self._eager(*args, **kwargs)

    setup = runner.FastPath.setup

    def with_graphs(plan, batch_size):
        speed = setup(plan, batch_size)
        speed.graphs = True
        return speed

    monkeypatch.setattr(runner.FastPath, "setup", staticmethod(with_graphs))
    monkeypatch.setattr(fast, "GraphedUNet", PassThrough)
    unet = pipes.txt2img.unet
    cfg = config(write_suite(tmp_path / "s"), images_per_prompt=1, edits=(), steps=3, batch_size=4)
    counts = []
    for k in range(2):
        before = len(seen)
        generate_run(tmp_path / f"r{k}", cfg, progress=False, pipelines=pipes)
        assert "forward" not in vars(unet)  # the class's own forward again
        counts.append((len(seen) - before, len(set(seen[before:]))))
    assert counts == [(3, 1), (3, 1)]  # one batch of 2 images, 3 UNet calls, one wrapper each run
    first, second = scores_by_image(tmp_path / "r0"), scores_by_image(tmp_path / "r1")
    np.testing.assert_allclose(second.loc[first.index, "mem_score_step1"], first["mem_score_step1"], rtol=SCORE_RTOL)
