"""``--engine ray`` for generation and bias probes on a local Ray cluster with 2 CPU workers and the tiny model:
the Ray run equals the local one (same files, same sha256, same rows in the same order, same run.json
settings), a killed driver resumes, a lost worker's batches go to the other, and the dispatcher keeps order.
The CLI's engine options give one-line errors (those tests need no Ray)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_photo_run, wait_for_rows
from test_generate import ROOT, assert_valid_run, cli, config, write_suite

from diffaudit.runs import Run, sha256_file

IMAGES_PER_PROMPT = 6  # 4 prompts x 6 = 24 images, 12 batches of 2: enough to spread over 2 workers and kill mid-run
BATCH = 2


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The suite and a local run of it (this process, one device): what every Ray run must equal."""
    import torch

    from generate.runner import generate_run

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ray-gen")
    suite = write_suite(root / "suite")
    cfg = config(suite, images_per_prompt=IMAGES_PER_PROMPT, batch_size=BATCH)
    generate_run(root / "local", cfg, progress=False)
    return suite, cfg, Run.open(root / "local")


def gen_args(suite: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--suite", str(suite), "--out", str(out), "-n", str(IMAGES_PER_PROMPT), "--steps", "2",
            "--size", "48x32", "--seed", "7", "--batch-size", str(BATCH), "--no-progress", *extra]


def assert_same_run(run: Run, local: Run, cfg) -> None:
    """Same images (bytes), same rows in the same order (timings aside), same settings in run.json."""
    gens, ref = assert_valid_run(run, cfg), local.read_table("generations")
    pd.testing.assert_frame_equal(gens.drop(columns="seconds"), ref.drop(columns="seconds"))
    for rel in ref["path"]:
        assert sha256_file(run.path(rel)) == sha256_file(local.path(rel)), rel
    assert run.info["generation"] == local.info["generation"]


@pytest.mark.slow
def test_ray_generation_equals_local_image_for_image(tmp_path, ray_cluster, reference, capsys):
    suite, cfg, local = reference
    cli(*gen_args(suite, tmp_path / "ray", "--engine", "ray", "--ray-workers", "2"))
    assert "24 images generated, 0 already done" in capsys.readouterr().out
    run = Run.open(tmp_path / "ray")
    assert_same_run(run, local, cfg)
    engine = run.info["stages"]["generate"]["engine"]
    assert engine["name"] == "ray" and engine["workers_lost"] == 0
    assert len({w["pid"] for w in engine["workers"]}) == 2 and all(w["batches"] >= 1 for w in engine["workers"])
    assert sum(w["batches"] for w in engine["workers"]) == 12
    assert run.info["stages"]["generate"]["generation_mode"] == local.info["stages"]["generate"]["generation_mode"]


CHILD = """
import sys, time
import diffaudit.commands.generate  # noqa: F401
import generate.runner as R
from generate import distributed
from diffaudit.cli import main
R.ROW_FLUSH_SECONDS = 0  # record every batch, so the kill lands between recorded batches
results = distributed.RayBatches.results
def slow(self, batches):  # hand out batches slowly, so the parent can kill the driver mid-way
    def paced():
        for b in batches:
            time.sleep(0.4)
            yield b
    return results(self, paced())
distributed.RayBatches.results = slow
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_killed_driver_resumes_to_the_local_run_despite_a_lost_worker(tmp_path, ray_cluster, reference,
                                                                      monkeypatch):
    from generate import distributed

    suite, cfg, local = reference
    out = tmp_path / "ray"
    address = ray_cluster.get_runtime_context().gcs_address  # the child driver joins this cluster
    args = gen_args(suite, out, "--engine", "ray", "--ray-workers", "2", "--address", address)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        wait_for_rows(child, out, 4, timeout=300)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    before = set(Run.open(out).read_table("generations")["image_id"])
    assert 4 <= len(before) <= 14  # at least 5 batches left: the worker killed below is handed one more

    # resume here (the dead driver's workers are stopped by Ray, two new ones take their CPUs), and lose a
    # worker after the first batch: the other makes the rest
    results = distributed.RayBatches.results

    def kill_one_after_the_first_batch(self, batches):
        for k, item in enumerate(results(self, batches)):
            if k == 0:
                ray_cluster.kill(self.actors[1])
            yield item

    monkeypatch.setattr(distributed.RayBatches, "results", kill_one_after_the_first_batch)
    summary = distributed.generate_run_ray(out, cfg, address=address, workers=2, progress=False)
    assert summary["skipped"] == len(before) and summary["generated"] == 24 - len(before)
    assert summary["workers_lost"] == 1
    run = Run.open(out)
    assert [w["lost"] for w in run.info["stages"]["generate"]["engine"]["workers"]] == [False, True]
    gens = assert_valid_run(run, cfg)
    ref = local.read_table("generations").set_index("image_id")
    assert dict(zip(gens["image_id"], gens["sha256"], strict=True)) == ref["sha256"].to_dict()
    assert run.info["generation"] == local.info["generation"]


@pytest.mark.slow
def test_ray_bias_probes_equal_local_rows(tmp_path, ray_cluster):
    from audit.bias import audit_bias

    local, remote = make_photo_run(tmp_path / "local"), make_photo_run(tmp_path / "ray")
    audit_bias(local, clip_model="tiny", batch_size=2, progress=False)
    from diffaudit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["audit", "bias", str(remote.root), "--clip-model", "tiny", "--batch-size", "2", "--engine", "ray",
              "--ray-workers", "2", "--no-progress"])
    assert e.value.code in (0, None)
    remote = Run.open(remote.root)
    for name in ("clip", "faces", "faces_attr", "skin_tone"):
        a, b = local.read_table(f"probes/{name}"), remote.read_table(f"probes/{name}")
        assert len(a) >= 5, name
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    pd.testing.assert_frame_equal(local.read_table("bias/summary"), remote.read_table("bias/summary"))
    stage, ref = remote.info["stages"]["bias"], local.info["stages"]["bias"]
    assert stage["versions"] == ref["versions"] and stage["face_detector"] == ref["face_detector"]
    assert stage["engine"]["name"] == "ray" and sum(w["batches"] for w in stage["engine"]["workers"]) == 3
    # resume: nothing pending, nothing probed again
    again = audit_bias(remote, clip_model="tiny", batch_size=2, progress=False, engine="ray", workers=2)
    assert again.probed == {"clip": 0, "faces": 0, "faces_attr": 0, "skin_tone": 0}


@pytest.mark.slow
def test_dispatch_keeps_order_and_survives_lost_workers(ray_cluster):
    from diffaudit.ray_cluster import Dispatch, WorkersLost, start_actors, stop

    class Doubler:  # defined here so that Ray ships it by value to its workers
        def __init__(self, die_at: int | None):
            self.die_at = die_at

        def run(self, x: int) -> int:
            if self.die_at is not None and x >= self.die_at:
                os._exit(1)
            time.sleep(0.01 * (x % 3))  # uneven work: results finish out of order
            return 2 * x

    actors = start_actors(Doubler, 1, {"num_cpus": 1}, None) + start_actors(Doubler, 1, {"num_cpus": 1}, 7)
    try:
        dispatch = Dispatch(actors, "run")
        assert list(dispatch.map(range(30))) == [(x, 2 * x) for x in range(30)]
        assert dispatch.lost == [1] and sum(dispatch.done) == 30 and dispatch.done[1] >= 1
    finally:
        stop(actors)
    actors = start_actors(Doubler, 2, {"num_cpus": 1}, 3)
    try:
        with pytest.raises(WorkersLost, match="rerun the same command"):
            list(Dispatch(actors, "run").map(range(10)))
    finally:
        stop(actors)


@pytest.mark.slow
def test_ray_requests_that_cannot_be_placed_are_refused(tmp_path, ray_cluster, reference, capsys):
    suite, _, _ = reference
    for extra, message in ((["--ray-workers", "3"], "has 2 CPU(s)"), ([], "pass --ray-workers N"),
                           (["--device", "cuda", "--ray-workers", "1"], "no GPU")):
        with pytest.raises(SystemExit) as e:
            cli(*gen_args(suite, tmp_path / "run", "--engine", "ray", *extra))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["generate", "bias"])
@pytest.mark.parametrize("extra, message", [
    (["--address", "ray://head:10001"], "--address needs --engine ray"),
    (["--ray-workers", "2"], "--ray-workers needs --engine ray"),
    (["--engine", "ray", "--ray-workers", "0"], "--ray-workers 0: give 1 or more"),
    (["--engine", "ray", "--address", "127.0.0.1:1", "--ray-workers", "1"], "cannot reach the Ray cluster"),
    (["--engine", "ray", "--address", "ray://", "--ray-workers", "1"], "give ray://HEAD:10001, HEAD:6379 or auto"),
    (["--engine", "ray", "--address", "head:", "--ray-workers", "1"], "give ray://HEAD:10001, HEAD:6379 or auto"),
    (["--engine", "ray", "--address", ":6379", "--ray-workers", "1"], "give ray://HEAD:10001, HEAD:6379 or auto"),
])
def test_cli_engine_options_are_checked_first(tmp_path, capsys, command, extra, message):
    run = make_photo_run(tmp_path / "photos")
    args = (["generate", "--suite", "demo", "--out", str(tmp_path / "run")] if command == "generate"
            else ["audit", "bias", str(run.root)])
    with pytest.raises(SystemExit) as e:
        cli(*args, *extra, "--no-progress")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "run").exists() and not run.has_table("probes/clip")


def test_ray_client_address_without_ray_client_says_what_to_install(tmp_path, capsys):
    import importlib.util
    import socket

    if importlib.util.find_spec("grpc") is not None:
        pytest.skip("ray[client] is installed")
    with socket.create_server(("127.0.0.1", 0)) as server:  # something listens: the address is reachable
        address = f"ray://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(SystemExit) as e:
            cli("generate", "--suite", "demo", "--out", str(tmp_path / "run"), "--engine", "ray", "--address",
                address, "--ray-workers", "1", "--no-progress")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'ray[client]'" in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_bias_on_a_locked_run_is_refused_before_probes_load_or_ray_starts(tmp_path, monkeypatch, engine):
    import threading

    import audit.bias
    from audit.bias import audit_bias
    from audit.distributed import RayProbes
    from diffaudit.errors import RunLockedError

    run = make_photo_run(tmp_path / "photos")
    started = []
    monkeypatch.setattr(audit.bias, "build_probes", lambda *a, **k: started.append("local"))
    monkeypatch.setattr(RayProbes, "start", classmethod(lambda cls, *a, **k: started.append("ray")))
    held, release = threading.Event(), threading.Event()

    def hold():  # another writer of the run (another thread is refused as another process would be)
        with run.lock():
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        with pytest.raises(RunLockedError, match="locked"):
            audit_bias(run, clip_model="tiny", progress=False, engine=engine, workers=1)
    finally:
        release.set()
        holder.join()
    assert started == [] and not run.has_table("probes/clip")


@pytest.mark.parametrize("command", ["generate", "bias"])
def test_ray_address_from_the_environment_is_the_cluster_joined(tmp_path, capsys, monkeypatch, command):
    """RAY_ADDRESS (set by `ray job submit`, or on a node of a cluster) names the cluster as --address does;
    Ray itself refused the local cluster's CPU count then, with a traceback."""
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    run = make_photo_run(tmp_path / "photos")
    args = (["generate", "--suite", "demo", "--out", str(tmp_path / "run")] if command == "generate"
            else ["audit", "bias", str(run.root)])
    with pytest.raises(SystemExit) as e:
        cli(*args, "--engine", "ray", "--ray-workers", "1", "--no-progress")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach the Ray cluster at 127.0.0.1:1") and "\n" not in err, err
    assert not (tmp_path / "run").exists() and not run.has_table("probes/clip")


@pytest.mark.slow
def test_a_workers_own_error_at_start_is_the_local_engines_one_line(tmp_path, ray_cluster, capsys):
    """Bad input that only a loaded model reveals (a strength that leaves no step) fails on the workers as it
    fails locally: the same line, not a hint about nodes (Ray keeps only the text of a constructor's error)."""
    suite = write_suite(tmp_path / "suite", strength=0.1)
    lines = []
    for extra in ((), ("--engine", "ray", "--ray-workers", "1")):
        with pytest.raises(SystemExit) as e:
            cli("generate", "--suite", str(suite), "--out", str(tmp_path / "run"), "-n", "1", "--steps", "2",
                "--size", "48x32", "--no-progress", *extra)
        assert e.value.code == 2
        lines.append(capsys.readouterr().err.strip())
        assert not (tmp_path / "run").exists()
    assert "leaves no denoising step" in lines[0] and lines[1] == lines[0], lines
    run, lines = make_photo_run(tmp_path / "photos"), []
    for extra in ((), ("--engine", "ray", "--ray-workers", "1")):  # the probes' workers likewise
        with pytest.raises(SystemExit) as e:
            cli("audit", "bias", str(run.root), "--probes", "clip", "--clip-model", str(tmp_path / "no-such-clip"),
                "--no-progress", *extra)
        assert e.value.code == 2
        lines.append(capsys.readouterr().err.strip())
    assert "no-such-clip" in lines[0] and lines[1] == lines[0], lines
