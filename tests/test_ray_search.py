"""``--engine ray`` search on a local Ray cluster with 2 CPU workers: the actors' merged answers equal the
local segment-wise search, actors keep (and build) their tables, and a grown index gets new actors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_scale_search import items_for, make_index, planted, same

import audit.memorization.search as search
from audit.memorization.index import Index, flat_search

pytestmark = pytest.mark.slow  # starting Ray takes 10-30 s on a shared machine


def test_ray_search_equals_local_and_keeps_tables(tmp_path, ray_cluster, monkeypatch):
    from audit.memorization.ray_engine import RaySearch

    monkeypatch.setattr(search, "SEGMENT_CODES", 70_000)
    rng = np.random.default_rng(9)
    codes = rng.integers(0, 2**64 - 1, 290_000, dtype=np.uint64)
    codes[[3, 200_000]] = codes[100]  # ties across actors for top-k
    root = tmp_path / "idx"
    index = make_index(root, codes[:250_000], [1_000, 120_000])
    queries = np.concatenate([codes[[100]], planted(codes, rng, 200)])

    remote = RaySearch.get(index.root, index.meta["shards"])
    # 3 segments with tables (70k each) and a scanned 40k tail, on 2 actors; the actors built the tables
    assert len(remote.actors) == 2 and sorted(n for a in remote.layout for n in a["segments"]) == [0, 1, 2, 3]
    assert all(a["bytes"] > 0 for a in remote.layout)
    assert sorted(p.name for p in (root / "mih").iterdir() if p.is_dir()) == ["000000", "000001", "000002"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (root / "mih").rglob("tables.json")}
    for r in (0, 4, 10, 16):
        got = index.search(queries, r, engine="ray")
        assert same(got, index.search(queries, r, engine="local")), r
        assert same(got, flat_search(codes[:250_000], queries, r)), r
    assert same(index.search(queries, 10, method="flat", engine="ray"), index.search(queries, 10))
    ids, d = index.topk(queries, 5, engine="ray")
    lids, ld = index.topk(queries, 5, engine="local")
    assert np.array_equal(ids, lids) and np.array_equal(d, ld) and ids[0, :3].tolist() == [3, 100, 200_000]
    assert RaySearch.get(index.root, index.meta["shards"]) is remote  # the same actors answer again
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (root / "mih").rglob("tables.json")}

    # the index grows: new actors for the new shard list, the old ones stopped, still equal to local
    index.append(codes[250_000:], items_for(250_000, 290_000), unit="test:more", counts={"indexed": 40_000})
    index = Index.open(root)
    search.use_engine("ray")
    try:
        got = index.search(queries, 10)
    finally:
        search.use_engine(None)
    assert same(got, flat_search(codes, queries, 10))
    assert remote.actors == [] and len(RaySearch._live) == 1


def test_cli_query_with_ray_engine_matches_local(tmp_path, ray_cluster, monkeypatch):
    from PIL import Image
    from typer.testing import CliRunner

    import diffaudit.commands.memorization  # noqa: F401 - registers the commands
    from audit.memorization.build import build_index
    from diffaudit.commands import app

    folder = tmp_path / "train"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    build_index([str(folder)], str(tmp_path / "idx"), progress=False, workers=1)
    runner = CliRunner()
    out = {}
    for engine in ("local", "ray"):
        res = runner.invoke(app, ["index", "query", str(folder / "2.png"), "--index", str(tmp_path / "idx"),
                                  "--json", "--engine", engine])
        assert res.exit_code == 0, res.output
        out[engine] = json.loads(res.output.splitlines()[-1])
    search.use_engine(None)
    for result in out.values():  # the confirmation's own cost is a timing, not an answer
        for m in result["matches"]:
            m.pop("confirm_ms", None)
    assert out["ray"] == out["local"] and out["local"]["nearest"][0]["key"] == "2.png"
    assert any(m["key"] == "2.png" and m["hamming"] == 0 for m in out["local"]["matches"])


def test_actors_that_cannot_read_the_index_give_one_line_error(tmp_path, ray_cluster):
    from audit.memorization.ray_engine import RaySearch
    from diffaudit.errors import ConfigError

    codes = np.random.default_rng(1).integers(0, 2**64 - 1, 1000, dtype=np.uint64)
    index = make_index(tmp_path / "idx", codes, [])
    (tmp_path / "idx" / "codes" / "000000.npy").unlink()  # as on a node that does not see the folder
    with pytest.raises(ConfigError, match="same path"):
        RaySearch.get(index.root, index.meta["shards"])
    assert not RaySearch._live
