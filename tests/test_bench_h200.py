"""bench/h200.py, the prepared GPU benchmark of issue 20, run here in its CPU smoke mode: the same stages and
code path (SD 1.5 builder aside) on the tiny models, so that the script a GPU session runs cannot rot. Its
figures measure nothing of issue 20 and say so."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import h200  # noqa: E402


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage_and_writes_jsonl(tmp_path, capsys):
    out = tmp_path / "h200.jsonl"
    assert h200.main(["--cpu-smoke", "--out", str(out)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == printed
    by = {}
    for line in lines:
        by.setdefault(line["stage"], []).append(line)
    assert not [line for line in lines if "failed" in line], lines
    assert set(by) == {"env", "matmul", "model", "attention", "naive", "runner", "probe", "figure"}
    assert by["env"][0]["mode"] == "cpu-smoke" and by["env"][0]["images"] == 12

    attention = by["attention"][0]
    math = attention["kernels"]["math"]
    assert math["ms"] > 0 and math["max_diff_vs_math"] == 0 and attention["unet_call_ms"]["math"] > 0
    for name, kernel in attention["kernels"].items():  # a backend that runs agrees with the math kernel
        if isinstance(kernel, dict):
            assert kernel["max_diff_vs_math"] < 1e-4, name
        else:
            assert kernel.startswith("unavailable"), name

    sweep = [n for n in by["naive"] if n.get("sweep")]
    baseline = next(n for n in by["naive"] if n.get("baseline"))
    assert [n["batch"] for n in sweep] == list(h200.SMOKE.sweep)
    assert baseline["batch"] == max(sweep, key=lambda n: n["img_per_s"])["batch"] and baseline["images"] == 12

    runners = {r["variant"]: r for r in by["runner"]}
    assert set(runners) == {"runner_fast", "runner_fast_repeat", "runner_no_fast"}
    for r in runners.values():  # every image compared with plain diffusers' for the same seed
        assert r["compared_images"] == 12 and r["max_pixel_diff"] <= 2 and r["mean_pixel_diff"] < 0.01
        assert r["img_per_s"] > 0 and r["wall_s"] >= r["seconds"]
    assert runners["runner_fast"]["mode"] == "exact fast path" and runners["runner_fast"]["decode_overlapped"]
    assert runners["runner_no_fast"]["mode"] == "plain" and not runners["runner_no_fast"]["decode_overlapped"]

    probe = by["probe"][0]
    assert probe["images"] == 12 and probe["rows"] == 3 * 12  # person, gender and age rows per image
    assert 0 < probe["share_of_audit_wall_time"] < 1

    figure = by["figure"][0]
    assert figure["runner"] == "runner_fast_repeat" and figure["baseline_batch"] == baseline["batch"]
    assert figure["runner_img_per_s"] == runners["runner_fast_repeat"]["img_per_s"]
    assert figure["ratio"] == pytest.approx(figure["runner_img_per_s"] / figure["baseline_img_per_s"], abs=2e-3)
    assert figure["compared_images"] == 12 and figure["gflop_per_image"] > 0 and 0 < figure["mfu"] < 1
    assert figure["targets_met"] is None and "measures nothing" in figure["note"]  # never claimed on a CPU


def test_check_lists_missing_modules_and_without_a_gpu_it_refuses(capsys, monkeypatch):
    assert h200.main(["--check"]) == 0
    assert json.loads(capsys.readouterr().out)["missing_modules"] == []
    monkeypatch.setattr(h200, "MODULES", (*h200.MODULES, "no_such_module_x"))
    assert h200.main([]) == 2
    assert json.loads(capsys.readouterr().out)["missing_modules"] == ["no_such_module_x"]
    monkeypatch.setattr(h200, "MODULES", h200.MODULES[:-1])
    import torch

    if not torch.cuda.is_available():
        assert h200.main([]) == 2
        assert "--cpu-smoke" in capsys.readouterr().err
