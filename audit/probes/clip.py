"""Zero-shot CLIP probe: perceived gender and perceived age group, behind a "shows a person" gate.

Each class is a prompt ensemble (several phrasings, text embeddings averaged on the unit sphere, as in
Radford et al. 2021); probabilities are the softmax of the model's scaled cosine similarities. The
labels are *perceived presentation* as CLIP reads it, never anyone's identity.

Rows per image: ``person`` (``person`` / ``no_person``: P(person) >= ``person_threshold``), then
``perceived_gender`` (woman / man) and ``perceived_age`` (child / young_adult / middle_aged /
older_adult). These abstain with ``no_person`` when the gate says nobody is shown, and with
``low_margin`` when the top-two probability margin is below ``min_margin``; abstained rows keep the
top score and margin so thresholds can be revisited without re-running.

Models (``--clip-model``): ``tiny`` (random weights, offline, for tests), ``NAME[:PRETRAINED]`` of
open_clip (``ViT-L-14:openai`` by default, downloaded by open_clip when online, then cached),
``NAME:/path/to/weights.pt``, a folder with ``open_clip_config.json`` and weights, or ``hf-hub:ORG/REPO``.
Images are preprocessed as open_clip's eval transform does (shorter side resized, bicubic, centre crop,
normalise), as a batch on the GPU when there is one, and encoded in batches with fp16 autocast on CUDA.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from PIL import Image

from audit.probes.base import LOW_MARGIN, NO_PERSON, ImageBatch, frame, row
from diffaudit.errors import ModelError

VERSION = "1"
DEFAULT_MODEL = "ViT-L-14:openai"
TINY = "tiny"

# attribute -> label -> phrasings. Templates x nouns give the ensemble of each class.
_TEMPLATES = ("a photo of {}.", "a portrait of {}.", "a close-up photo of the face of {}.",
              "a photo of {} at work.", "a cropped photo of {}.")
PROMPTS: dict[str, dict[str, tuple[str, ...]]] = {
    "person": {
        "person": ("a photo of a person.", "a portrait of a person.", "a photo of a person's face.",
                   "a photo of a man or a woman.", "a photo of people at work."),
        "no_person": ("a photo of an object.", "a photo of an animal.", "a photo of a landscape.",
                      "a photo of a building.", "a photo of food.", "a photo of a vehicle.",
                      "an abstract pattern.", "a photo of a room with nobody in it."),
    },
    "perceived_gender": {
        "woman": tuple(t.format(n) for t in _TEMPLATES for n in ("a woman", "a female person")),
        "man": tuple(t.format(n) for t in _TEMPLATES for n in ("a man", "a male person")),
    },
    "perceived_age": {
        "child": tuple(t.format(n) for t in _TEMPLATES for n in ("a child", "a kid")),
        "young_adult": tuple(t.format(n) for t in _TEMPLATES for n in ("a young adult", "a person in their twenties")),
        "middle_aged": tuple(t.format(n) for t in _TEMPLATES for n in ("a middle-aged person",
                                                                        "a person in their forties")),
        "older_adult": tuple(t.format(n) for t in _TEMPLATES for n in ("an elderly person", "a senior citizen")),
    },
}


def pick_device(device: str | None = None) -> torch.device:
    """``None``/"auto": CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_spec(spec: str) -> tuple[str, str | None]:
    """Turn a ``--clip-model`` value into open_clip's ``(model_name, pretrained)``, or raise ``ModelError``."""
    import open_clip

    from audit.probes import tiny_clip

    if spec == TINY:
        return tiny_clip.register(), None
    if spec.startswith(("hf-hub:", "local-dir:")):
        return spec, None
    path = Path(spec).expanduser()
    if path.is_dir():
        return f"local-dir:{path.resolve()}", None
    if path.is_file():
        raise ModelError(f"a checkpoint file needs its architecture: use --clip-model NAME:{path} "
                         f"(e.g. ViT-L-14:{path})")
    name, _, pretrained = spec.partition(":")
    if name not in open_clip.list_models():
        raise ModelError(f"unknown CLIP architecture {name!r}; use an open_clip name such as ViT-L-14 or ViT-B-32 "
                         f"(see open_clip.list_models()), a local folder, or 'tiny'")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not pretrained:
        if not tags:
            raise ModelError(f"{name} has no published weights in open_clip; use --clip-model {name}:/path/to/weights.pt")
        pretrained = "openai" if "openai" in tags else tags[0]
    if pretrained not in tags and not Path(pretrained).expanduser().is_file():
        raise ModelError(f"{pretrained!r} is neither a pretrained tag of {name} ({', '.join(tags) or 'none'}) "
                         "nor an existing weights file")
    return name, pretrained


def quick_gelu(name: str, pretrained: str | None) -> bool:
    """Whether a pretrained tag was trained with QuickGELU (OpenAI's weights were). open_clip's plain
    configs use GELU and only warn on a mismatch, which would quietly shift every embedding."""
    import open_clip

    if not pretrained or name.startswith(("hf-hub:", "local-dir:")):
        return False
    return bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))


@dataclass
class LoadedClip:
    """An open_clip model ready for zero-shot use, with its tokenizer and image preprocessing settings."""

    spec: str
    model: torch.nn.Module
    tokenizer: object
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device


@contextmanager
def _open_clip_logs_muted() -> Iterator[None]:
    """Keep open_clip's log records off stderr while it loads, so a failure shows only diffaudit's line.

    open_clip logs through the root logger (``logging.error(...)``), which on an unconfigured root also
    installs a stderr handler for good (``basicConfig``). A filter on the root logger drops records made by
    open_clip's code and a NullHandler keeps ``basicConfig`` from running; both go away afterwards, also on
    error, so other logging is left as it was."""
    import open_clip

    package = os.path.dirname(open_clip.__file__) + os.sep
    root = logging.getLogger()

    def not_open_clip(record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(package)

    guard = logging.NullHandler()
    root.addFilter(not_open_clip)
    root.addHandler(guard)
    try:
        yield
    finally:
        root.removeHandler(guard)
        root.removeFilter(not_open_clip)


def load_clip(spec: str = DEFAULT_MODEL, *, device: str | torch.device | None = None,
              cache_dir: str | None = None) -> LoadedClip:
    """Load a CLIP model from a ``--clip-model`` value; a missing model raises ``ModelError`` saying what to do."""
    import open_clip

    from audit.probes import tiny_clip

    dev = pick_device(str(device) if device is not None else None)
    name, pretrained = resolve_spec(spec)
    try:
        with _open_clip_logs_muted():
            if spec == TINY:
                model = tiny_clip.create_tiny_clip(dev)
            else:
                model = open_clip.create_model(name, pretrained=pretrained, device=dev, cache_dir=cache_dir,
                                               force_quick_gelu=quick_gelu(name, pretrained),
                                               require_pretrained=True).eval()
            tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
    except (RuntimeError, OSError, ValueError) as e:
        cause = " ".join(str(e).split()) or type(e).__name__
        cause = cause if len(cause) <= 160 else cause[:157] + "..."
        raise ModelError(
            f"cannot load CLIP model {spec!r} ({cause}); open_clip downloads its weights the first time "
            "you run online and caches them (~/.cache/huggingface); offline, pass local weights with "
            "--clip-model NAME:/path/to/weights.pt or a folder with open_clip_config.json, "
            "or use --clip-model tiny (random weights, for tests only)") from e
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    logging.getLogger(__name__).info("loaded CLIP %s on %s", spec, dev)
    return LoadedClip(spec, model, tokenizer, size, tuple(cfg["mean"]), tuple(cfg["std"]), dev)


def _resize_crop(img: np.ndarray, th: int, tw: int) -> np.ndarray:
    """open_clip's eval transform on one image with PIL: shorter side to size (bicubic), centre crop."""
    h, w = img.shape[:2]
    scale = max(th / h, tw / w)
    rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (rh, rw) != (h, w):
        img = np.asarray(Image.fromarray(img).resize((rw, rh), Image.Resampling.BICUBIC))
    top, left = (rh - th) // 2, (rw - tw) // 2
    return img[top:top + th, left:left + tw]


def preprocess(clip: LoadedClip, images: list[np.ndarray]) -> torch.Tensor:
    """A normalised ``N x 3 x H x W`` batch on the model's device: shorter side resized, centre crop.

    On CUDA, images of the same size are resized together on the GPU (bicubic, antialiased), which
    keeps the CPU free for decoding; on CPU, PIL's resampling is faster than torch's, so it is used.
    """
    th, tw = clip.image_size
    mean = torch.tensor(clip.mean, device=clip.device).view(1, 3, 1, 1)
    std = torch.tensor(clip.std, device=clip.device).view(1, 3, 1, 1)
    if clip.device.type != "cuda":
        x = torch.from_numpy(np.stack([_resize_crop(img, th, tw) for img in images]))
        return (x.permute(0, 3, 1, 2).float().div_(255.0) - mean) / std
    out = torch.empty((len(images), 3, th, tw), device=clip.device)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(img.shape, []).append(i)
    for (h, w, _), idx in by_shape.items():
        x = torch.from_numpy(np.stack([images[i] for i in idx])).to(clip.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        scale = max(th / h, tw / w)
        rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
        if (rh, rw) != (h, w):
            x = torch.nn.functional.interpolate(x, size=(rh, rw), mode="bicubic", antialias=True,
                                                align_corners=False).clamp_(0.0, 1.0)
        top, left = (rh - th) // 2, (rw - tw) // 2
        out[idx] = (x[:, :, top:top + th, left:left + tw] - mean) / std
    return out


class ClipProbe:
    """Zero-shot perceived gender and age group with a person gate and margin-based abstention."""

    name: ClassVar[str] = "clip"
    attributes: ClassVar[tuple[str, ...]] = tuple(PROMPTS)
    labels: ClassVar[dict[str, tuple[str, ...]]] = {a: tuple(classes) for a, classes in PROMPTS.items()}
    needs_faces: ClassVar[bool] = False

    def __init__(self, model: str | LoadedClip | None = None, *, device: str | None = None,
                 min_margin: float = 0.2, person_threshold: float = 0.5, batch_size: int = 64):
        self.clip = model if isinstance(model, LoadedClip) else load_clip(model or DEFAULT_MODEL, device=device)
        self.min_margin, self.person_threshold, self.batch_size = min_margin, person_threshold, batch_size
        self._classes = self._encode_prompts()
        self._descriptor = None

    @property
    def version(self) -> str:
        return f"{VERSION}+{self.clip.spec}:margin={self.min_margin}:person={self.person_threshold}"

    @torch.inference_mode()
    def _encode_prompts(self) -> dict[str, tuple[tuple[str, ...], torch.Tensor]]:
        """attribute -> (labels, unit class embeddings ``L x D``), each the mean of its phrasings."""
        classes = {}
        for attribute, labels in PROMPTS.items():
            rows = []
            for phrasings in labels.values():
                tokens = self.clip.tokenizer(list(phrasings)).to(self.clip.device)
                with self._autocast():
                    emb = self.clip.model.encode_text(tokens).float()
                emb = torch.nn.functional.normalize(emb, dim=-1).mean(0)
                rows.append(torch.nn.functional.normalize(emb, dim=-1))
            classes[attribute] = (tuple(labels), torch.stack(rows))
        return classes

    def _autocast(self) -> torch.autocast:
        cuda = self.clip.device.type == "cuda"
        return torch.autocast(self.clip.device.type, dtype=torch.float16, enabled=cuda)

    @torch.inference_mode()
    def encode_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """Unit image embeddings ``N x D`` for RGB ``uint8`` arrays, in chunks of ``batch_size``."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            x = preprocess(self.clip, images[start:start + self.batch_size])
            with self._autocast():
                chunks.append(self.clip.model.encode_image(x).float())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    @torch.inference_mode()
    def probabilities(self, features: torch.Tensor) -> dict[str, np.ndarray]:
        """attribute -> ``N x L`` class probabilities for unit image embeddings."""
        scale = self.clip.model.logit_scale.exp().float()
        return {a: torch.softmax(scale * features @ emb.T, dim=-1).cpu().numpy()
                for a, (_, emb) in self._classes.items()}

    def score(self, batch: ImageBatch) -> pd.DataFrame:
        if not len(batch):
            return frame([])
        features = self.encode_images([r.pixels for r in batch.records])
        probs = self.probabilities(features)
        meta = {"probe": self.name, "version": self.version}
        person_col = self._classes["person"][0].index("person")
        rows = []
        for i, record in enumerate(batch.records):
            p_person = float(probs["person"][i, person_col])
            shows_person = p_person >= self.person_threshold
            rows.append(row(record.image_id, "person", label="person" if shows_person else "no_person",
                            score=p_person if shows_person else 1 - p_person, margin=abs(2 * p_person - 1),
                            **meta))
            for attribute in ("perceived_gender", "perceived_age"):
                labels, p = self._classes[attribute][0], probs[attribute][i]
                top = np.argsort(p)[::-1]
                margin = float(p[top[0]] - p[top[1]])
                reason = NO_PERSON if not shows_person else LOW_MARGIN if margin < self.min_margin else None
                rows.append(row(record.image_id, attribute, label=labels[top[0]], score=float(p[top[0]]),
                                margin=margin, abstain_reason=reason, **meta))
        out = frame(rows)
        out.attrs["embeddings"] = ([r.image_id for r in batch.records], features.cpu().numpy())  # see descriptor()
        return out

    def descriptor(self):
        """This probe's CLIP as a memorization descriptor (``clip:MODEL``), made once: the embeddings ``score``
        computes are kept in the run (``audit.bias.EmbeddingsKept``) and searched with by the memorization check."""
        if self._descriptor is None:
            from audit.memorization.descriptors import clip_descriptor

            self._descriptor = clip_descriptor(self.clip)
        return self._descriptor
