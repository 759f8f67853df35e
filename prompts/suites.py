"""Load, validate and expand prompt suites.

A suite is a YAML file in this folder (or any path): cited ``sources``, ``templates`` with a
``{subject}`` slot (and ``{a}`` for its indefinite article), ``subjects``, and optional ``edits``
(img2img / inpaint requests on a source image). Expansion gives one ``Request`` per prompt with its
seeds; a seed depends only on (run seed, prompt_id, index), never on batch size or order.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field, field_validator, model_validator

from diffaudit.config import Frozen, load_yaml, validate
from diffaudit.errors import InputError, SuiteError
from diffaudit.imaging import check_pixels, image_size, max_pixels, open_image

SUITES_DIR = Path(__file__).parent
_ID = r"^[a-z0-9][a-z0-9_]*$"
BUILTIN_SOURCES = {
    "skimage": ("astronaut", "coffee", "chelsea", "camera", "rocket", "retina", "cat", "immunohistochemistry"),
    "sklearn": ("china.jpg", "flower.jpg"),
}


EDIT_TEMPLATE = "edit"  # the template value of edit requests (img2img / inpaint of a source image)


class Template(Frozen):
    id: str = Field(pattern=_ID)
    text: str
    source: str | None = None

    @field_validator("text")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        if "{subject}" not in v:
            raise ValueError("a template needs a {subject} slot")
        unknown = set(re.findall(r"{(\w*)}", v)) - {"subject", "a"}
        if unknown:
            raise ValueError(f"unknown slot(s) {sorted(unknown)}; use {{subject}} and {{a}}")
        return v


class Subject(Frozen):
    id: str = Field(pattern=_ID)
    text: str = Field(min_length=1)
    article: Literal["a", "an", ""] | None = None
    bls: str | None = None  # row of the BLS 2022 cpsaat11 table
    unmapped: str | None = None  # why there is no BLS row

    @property
    def a(self) -> str:
        if self.article is not None:
            return self.article
        return "an" if self.text[:1].lower() in "aeiou" else "a"


class Edit(Frozen):
    """An image-to-image or inpainting request on a source image."""

    id: str = Field(pattern=_ID)
    mode: Literal["img2img", "inpaint"]
    prompt: str
    negative_prompt: str | None = None
    source: str  # "skimage:NAME", "sklearn:NAME" or a path (relative to the suite file)
    mask: str | None = None  # "box:x0,y0,x1,y1" in fractions of the image, or a path
    strength: float = Field(0.75, gt=0, le=1)
    subject: str | None = None

    @model_validator(mode="after")
    def _mask_for_inpaint(self) -> Edit:
        if self.mode == "inpaint" and not self.mask:
            raise ValueError("inpaint needs a mask")
        if self.mode == "img2img" and self.mask:
            raise ValueError("img2img takes no mask (use mode: inpaint)")
        return self


class Suite(Frozen):
    name: str = Field(pattern=_ID)
    description: str
    sources: list[str] = Field(min_length=1)
    negative_prompt: str = ""
    templates: list[Template] = []
    subjects: list[Subject] = []
    edits: list[Edit] = []

    @model_validator(mode="after")
    def _unique(self) -> Suite:
        for what, items in (("template", self.templates), ("subject", self.subjects), ("edit", self.edits)):
            ids = [i.id for i in items]
            dup = sorted({i for i in ids if ids.count(i) > 1})
            if dup:
                raise ValueError(f"duplicate {what} id(s): {dup}")
        if bool(self.templates) != bool(self.subjects):
            raise ValueError("templates and subjects go together: give both or neither")
        if not self.subjects and not self.edits:
            raise ValueError("a suite needs subjects with templates, or edits")
        return self


class Request(Frozen):
    """One prompt to generate ``len(seeds)`` images for."""

    prompt_id: str
    suite: str
    subject: str
    template: str
    prompt: str
    negative_prompt: str
    mode: Literal["txt2img", "img2img", "inpaint"] = "txt2img"
    source_image: str | None = None
    mask: str | None = None
    strength: float | None = None
    seeds: tuple[int, ...]

    def image_id(self, seed: int) -> str:
        return f"{self.prompt_id}-{seed}"


def derive_seed(run_seed: int, prompt_id: str, index: int) -> int:
    """A 63-bit seed from (run seed, prompt_id, index): independent of batching and order, and wide enough
    that two images of one prompt never share a seed (a 32-bit seed would collide in ~5% of large audits)."""
    digest = hashlib.sha256(f"{int(run_seed)}/{prompt_id}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def list_suites() -> list[str]:
    """Names of the built-in suites (the YAML files in this folder)."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def suite_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"}:
        if not p.is_file():
            raise SuiteError(f"suite file {p} does not exist")
        return p
    builtin = SUITES_DIR / f"{name_or_path}.yaml"
    if not builtin.is_file():
        raise SuiteError(f"unknown suite {str(name_or_path)!r}; built-in suites: {', '.join(list_suites())} "
                         "(or pass a path to a .yaml file)")
    return builtin


@cache
def _load(path: Path, mtime: float, cap: int) -> Suite:
    data, lines = load_yaml(path, SuiteError)
    suite = validate(Suite, data, path, lines, SuiteError)
    for i, edit in enumerate(suite.edits):
        for field, ref in (("source", edit.source), ("mask", edit.mask)):
            if ref is not None:
                problem = _check_ref(ref, path.parent, field)
                if problem:
                    line = lines.get(("edits", i, field))
                    raise SuiteError(f"{path}:{line}: field 'edits.{i}.{field}': {problem}")
    return suite


def load_suite(name_or_path: str | Path) -> Suite:
    """Load and validate a suite by built-in name or path. Errors name the file, line and field."""
    path = suite_path(name_or_path).resolve()
    return _load(path, path.stat().st_mtime, max_pixels())  # the cap decides which source images pass


def _check_ref(ref: str, base: Path, field: str) -> str | None:
    scheme, _, name = ref.partition(":")
    if scheme in BUILTIN_SOURCES and name:
        return None if name in BUILTIN_SOURCES[scheme] else (
            f"unknown {scheme} image {name!r}; choose from {', '.join(BUILTIN_SOURCES[scheme])}")
    if scheme == "box" and field == "mask":
        try:
            x0, y0, x1, y1 = (float(v) for v in name.split(","))
        except ValueError:
            return f"mask {ref!r} must look like box:x0,y0,x1,y1 (fractions)"
        return None if 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 else f"mask box {ref!r} is outside [0, 1]"
    path = base / ref
    if not path.is_file():
        return f"file {ref!r} not found (relative to {base})"
    try:  # header only: a bomb or a non-image is refused here, before a run folder exists
        check_pixels(*image_size(path, name=ref), name=ref)
    except InputError as e:
        return str(e)
    return None


def load_source(ref: str) -> Image.Image:
    """The source image of a request (``skimage:NAME``, ``sklearn:NAME`` or a path) as RGB at its own size,
    or ``InputError``. Generation and provenance both open sources through this one function."""
    scheme, _, name = ref.partition(":")
    if scheme == "skimage" and name:
        import skimage.data

        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise InputError(f"scikit-image ships no image {name!r} (source {ref!r})")
        try:
            array = np.asarray(loader())
        except (ModuleNotFoundError, OSError) as e:  # some skimage images need a download (pooch)
            raise InputError(f"source {ref!r} is not available offline: {e}") from e
        return Image.fromarray(array).convert("RGB")
    if scheme == "sklearn" and name:
        from sklearn.datasets import load_sample_image

        try:
            return Image.fromarray(load_sample_image(name)).convert("RGB")
        except (AttributeError, OSError, ValueError) as e:
            raise InputError(f"scikit-learn ships no sample image {name!r} (source {ref!r})") from e
    path = Path(ref).expanduser()
    if not path.is_file():
        raise InputError(f"source image {ref} does not exist")
    # the one decode policy: the header's size against the pixel cap before any pixel is decoded
    return open_image(path, name=f"source image {ref}", mode="RGB")


def resolve_ref(ref: str | None, suite_file: Path) -> str | None:
    """Builtin refs stay as they are; file refs become absolute paths."""
    if ref is None:
        return None
    scheme, _, name = ref.partition(":")
    if (scheme in BUILTIN_SOURCES and name) or scheme == "box":
        return ref
    return str((suite_file.parent / ref).resolve())


def expand(suite_name_or_path: str | Path, *, images_per_prompt: int, seed: int = 0,
           templates: tuple[str, ...] | None = None, subjects: tuple[str, ...] | None = None,
           edits: tuple[str, ...] | None = None) -> list[Request]:
    """Expand a suite into requests: templates x subjects (txt2img), then edits. Stable order and ids.

    ``templates``, ``subjects`` and ``edits`` pick subsets by id (None: all; an empty tuple: none).
    """
    if images_per_prompt < 1:
        raise SuiteError("images_per_prompt must be at least 1")
    path = suite_path(suite_name_or_path).resolve()
    suite = load_suite(path)
    chosen_t = _subset(suite.templates, templates, "template", suite.name)
    chosen_s = _subset(suite.subjects, subjects, "subject", suite.name)
    requests = []

    def seeds(prompt_id: str) -> tuple[int, ...]:
        out = tuple(derive_seed(seed, prompt_id, i) for i in range(images_per_prompt))
        if len(set(out)) != len(out):  # would merge two images into one image_id
            raise SuiteError(f"seed collision in {prompt_id!r}; choose another --seed")
        return out

    for t in chosen_t:
        for s in chosen_s:
            prompt_id = f"{t.id}-{s.id}"
            prompt = t.text.replace("{a}", s.a).replace("{subject}", s.text)
            prompt = re.sub(r"\s+", " ", prompt).strip()
            requests.append(Request(prompt_id=prompt_id, suite=suite.name, subject=s.id, template=t.id,
                                    prompt=prompt, negative_prompt=suite.negative_prompt, seeds=seeds(prompt_id)))
    for e in _subset(suite.edits, edits, "edit", suite.name):
        prompt_id = f"{e.mode}-{e.id}"
        requests.append(Request(
            prompt_id=prompt_id, suite=suite.name, subject=e.subject or e.id, template=EDIT_TEMPLATE,
            prompt=e.prompt, negative_prompt=e.negative_prompt if e.negative_prompt is not None
            else suite.negative_prompt, mode=e.mode, source_image=resolve_ref(e.source, path),
            mask=resolve_ref(e.mask, path), strength=e.strength, seeds=seeds(prompt_id)))
    return requests


def _subset(items: list, wanted: tuple[str, ...] | None, what: str, suite: str) -> list:
    if wanted is None:
        return list(items)
    ids = {i.id: i for i in items}
    unknown = [w for w in wanted if w not in ids]
    if unknown:
        raise SuiteError(f"suite {suite!r} has no {what}(s) {unknown}; it has: {', '.join(ids)}")
    return [ids[w] for w in wanted]
