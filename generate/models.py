"""Load diffusion pipelines from a model spec: ``tiny``, a hub id, a local diffusers folder or a single
``.safetensors`` checkpoint. One loaded text-to-image pipeline; the image-to-image and inpainting
pipelines share its weights (``from_pipe``), except for the tiny model's own 9-channel inpainting UNet.

Only UNet-based Stable Diffusion families (SD 1.x/2.x, SDXL, SD-Turbo) are supported. The safety
checker, where a model has one, is detached from the pipeline and run separately, so an NSFW image is
flagged in the ``nsfw`` column instead of being silently replaced by a black square.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit.errors import ConfigError, ModelError

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")
MODES = ("txt2img", "img2img", "inpaint")


def check_scheduler(name: str | None) -> None:
    if name is not None and name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose from: {', '.join(SCHEDULERS)}")


def resolve_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str):
    """``auto``: fp16 on CUDA (bf16 is selectable), fp32 elsewhere."""
    import torch

    if dtype == "auto":
        dtype = "float16" if device.startswith(("cuda", "mps")) else "float32"
    return getattr(torch, dtype)


def model_kind(spec: str) -> str:
    """``tiny``, ``folder``, ``single_file`` or ``hub`` (a missing local path is a ``ModelError``)."""
    if spec == "tiny":
        return "tiny"
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise ModelError(f"{spec} is a folder without model_index.json; give a diffusers folder "
                             "(pipeline.save_pretrained) or a single .safetensors checkpoint")
        return "folder"
    if p.is_file():
        if p.suffix not in (".safetensors", ".ckpt"):
            raise ModelError(f"{spec} is a file but not a .safetensors or .ckpt checkpoint")
        return "single_file"
    if spec.startswith(("/", "./", "../", "~")) or p.suffix in (".safetensors", ".ckpt") or spec.count("/") != 1:
        raise ModelError(f"model {spec!r} not found: no such local folder or file, and it is not a hub id "
                         "(org/name)")
    return "hub"


@dataclass
class Pipelines:
    """A loaded model: the text-to-image pipeline, the others derived on demand, and what to record."""

    spec: str
    kind: str
    txt2img: Any
    device: str
    dtype: Any
    revision: str | None
    scheduler: str
    default_steps: int
    default_guidance: float
    default_size: tuple[int, int]  # (width, height)
    safety_policy: str  # flag | off | unavailable
    inpaint_folder: Path | None = None
    compiled: bool = False
    _safety: tuple[Any, Any] | None = None
    _derived: dict[str, Any] = field(default_factory=dict)

    def for_mode(self, mode: str):
        """The pipeline for ``txt2img``, ``img2img`` or ``inpaint`` (``ModelError`` if the family has none)."""
        if mode == "txt2img":
            return self.txt2img
        if mode not in self._derived:
            self._derived[mode] = self._derive(mode)
        return self._derived[mode]

    def _derive(self, mode: str):
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        base = self.txt2img
        try:
            if mode == "inpaint" and self.inpaint_folder is not None:
                from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    unet = UNet2DConditionModel.from_pretrained(self.inpaint_folder / "unet", torch_dtype=self.dtype)
                unet = _speed_up_unet(unet.to(self.device), self.device, compile_=self.compiled)
                pipe = StableDiffusionInpaintPipeline(
                    vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
                    scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False)
            elif mode == "img2img":
                pipe = AutoPipelineForImage2Image.from_pipe(base)
            elif mode == "inpaint":
                pipe = AutoPipelineForInpainting.from_pipe(base)
            else:
                raise ConfigError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        except (ValueError, KeyError) as e:
            raise ModelError(f"model {self.spec} ({type(base).__name__}) has no {mode} pipeline: {e}") from e
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def flags_nsfw(self) -> bool:
        """Whether a safety checker runs beside generation (``flag_nsfw`` returns flags, not None)."""
        return self._safety is not None

    def flag_nsfw(self, images: np.ndarray) -> list[bool] | None:
        """Run the safety checker on uint8 (B, H, W, 3) images: one flag per image, None without one."""
        if self._safety is None:
            return None
        import torch

        checker, extractor = self._safety
        clip_input = extractor(list(images), return_tensors="pt").pixel_values.to(self.device, self.dtype)
        with torch.no_grad():
            _, flags = checker(images=images.astype(np.float32) / 255.0, clip_input=clip_input)
        return [bool(f) for f in flags]

    def info(self) -> dict[str, Any]:
        """What run.json records about the model."""
        import diffusers
        import torch
        import transformers

        return {
            "model": self.spec, "model_kind": self.kind, "model_revision": self.revision,
            "pipeline": type(self.txt2img).__name__, "scheduler": self.scheduler,
            "scheduler_class": type(self.txt2img.scheduler).__name__, "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."), "compile": self.compiled,
            "safety_checker": self.safety_policy,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__},
        }


def load_pipelines(spec: str, *, scheduler: str | None = None, device: str = "auto", dtype: str = "auto",
                   safety_checker: str = "flag", compile_: bool = False, progress: bool = True) -> Pipelines:
    """Load a model spec onto a device, or raise ``ModelError`` with what to do. ``progress``: a bar while the
    tiny model is built on first use."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    check_scheduler(scheduler)
    kind = model_kind(spec)
    for lib in (diffusers_logging, transformers_logging):  # loading bars and chatter drown the run's own bar
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    inpaint_folder = None
    if kind == "tiny":
        from generate import tiny

        folder = tiny.ensure_tiny(progress=progress)
        pipe = _load_pretrained(str(folder / "base"), spec, torch_dtype)
        inpaint_folder = folder / "inpaint"
        revision = f"tiny-v{tiny.VERSION}:sha256:{_hash_weights(folder / 'base')[:16]}"
        steps, guidance = tiny.STEPS, tiny.GUIDANCE
    elif kind == "single_file":
        pipe = _load_single_file(spec, torch_dtype)
        revision = f"sha256:{_hash_weights(Path(spec))}"
        steps, guidance = _defaults(spec)
    else:
        pipe = _load_pretrained(spec, spec, torch_dtype)
        revision = _hub_revision(spec) if kind == "hub" else f"sha256:{_hash_weights(Path(spec))}"
        steps, guidance = _defaults(spec)
    return wrap_pipeline(pipe, spec=spec, kind=kind, revision=revision, steps=steps, guidance=guidance,
                         device=device, dtype=torch_dtype, scheduler=scheduler, safety_checker=safety_checker,
                         compile_=compile_, inpaint_folder=inpaint_folder)


def wrap_pipeline(pipe, *, spec: str, kind: str, revision: str | None, steps: int, guidance: float, device: str,
                  dtype, scheduler: str | None = None, safety_checker: str = "flag", compile_: bool = False,
                  inpaint_folder: Path | None = None) -> Pipelines:
    """Make a built text-to-image pipeline ready to run (device, dtype, scheduler, safety policy, CUDA
    switches). ``load_pipelines`` ends here; benchmarks call it on pipelines they build themselves."""
    check_scheduler(scheduler)
    if getattr(pipe, "unet", None) is None:
        raise ModelError(f"model {spec} loads as {type(pipe).__name__}; diffaudit supports the UNet-based "
                         "Stable Diffusion families (SD 1.x/2.x, SDXL, SD-Turbo)")
    safety = _detach_safety_checker(pipe)
    policy = "unavailable" if safety is None else safety_checker
    if scheduler is not None:
        cls_name, extra = SCHEDULERS[scheduler]
        import diffusers

        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    pipe.to(device, dtype)
    if safety is not None and policy == "flag":
        safety[0].to(device, dtype)
    compiled = compile_ and device.startswith("cuda")  # --compile is a CUDA speed-up: elsewhere nothing compiles
    _speed_up(pipe, device, compile_=compiled)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return Pipelines(
        spec=spec, kind=kind, txt2img=pipe, device=device, dtype=dtype, revision=revision,
        scheduler=scheduler or _scheduler_name(pipe.scheduler), default_steps=steps, default_guidance=guidance,
        default_size=(size, size), safety_policy=policy, inpaint_folder=inpaint_folder, compiled=compiled,
        _safety=safety if policy == "flag" else None)


def _load_pretrained(path: str, spec: str, torch_dtype):
    from diffusers import AutoPipelineForText2Image

    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones lack dtype
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)  # hub deprecation chatter on a failed lookup
            return AutoPipelineForText2Image.from_pretrained(path, torch_dtype=torch_dtype)
    except Exception as e:  # diffusers/hub raise many types (OSError, ValueError, HTTP errors)
        raise ModelError(_not_loaded(spec, e)) from e


def _load_single_file(path: str, torch_dtype):
    """A single checkpoint: SDXL if it has SDXL's second text encoder, SD 1.x/2.x otherwise."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionPipeline
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                if any(k.startswith("conditioner.embedders.1.") for k in f.keys()):  # noqa: SIM118
                    cls = StableDiffusionXLPipeline
        except Exception as e:
            raise ModelError(f"{path} is not a readable safetensors checkpoint: {e}") from e
    try:
        return cls.from_single_file(path, torch_dtype=torch_dtype)
    except Exception as e:
        raise ModelError(_not_loaded(path, e)) from e


def _not_loaded(spec: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    hint = ("HF_HUB_OFFLINE is set, so only models already in the hub cache load; "
            if offline else "check the id and your network, or set HF_HUB_OFFLINE=1 to use the cache only; ")
    return (f"could not load model {spec!r} ({first[:200]}). {hint}or pass a local diffusers folder or a "
            ".safetensors file (single files also need their base config cached or online)")


def _defaults(spec: str) -> tuple[int, float]:
    """Steps and guidance: distilled turbo models take 1 step without guidance; others 30 steps, CFG 7.5."""
    return (1, 0.0) if "turbo" in spec.lower() else (30, 7.5)


def _scheduler_name(scheduler) -> str:
    cls = type(scheduler).__name__
    for name, (cls_name, extra) in SCHEDULERS.items():
        if cls_name == cls and all(scheduler.config.get(k) == v for k, v in extra.items()):
            return name
    return cls


def _detach_safety_checker(pipe) -> tuple[Any, Any] | None:
    """Take the safety checker off the pipeline (it would black images out) and return it to run apart."""
    checker = getattr(pipe, "safety_checker", None)
    extractor = getattr(pipe, "feature_extractor", None)
    if checker is None or extractor is None:
        return None
    pipe.register_modules(safety_checker=None)
    pipe.register_to_config(requires_safety_checker=False)
    return checker, extractor


def _speed_up(pipe, device: str, *, compile_: bool) -> None:
    """With ``--compile`` on CUDA: cuDNN autotuning, channels-last, fused QKV projections, 1x1 convolutions as
    matmuls, compiled UNet and VAE decode. Measured on an H100 (DESIGN.md), channels-last and cuDNN autotuning
    alone made eager SD 1.5 slower, so eager stays plain. Compiled shapes are fixed: the runner pads a short
    last batch so that it does not recompile (a minute per new shape)."""
    import torch

    if not (compile_ and device.startswith("cuda")):
        return
    torch.backends.cudnn.benchmark = True
    pipe.unet = _speed_up_unet(pipe.unet, device, compile_=compile_)
    vae = pipe.vae
    _fuse_qkv(vae)
    vae.to(memory_format=torch.channels_last)
    decode = torch.compile(type(vae).decode.__get__(vae))

    def decode_without_generator(z, return_dict: bool = True, generator=None):
        # Pipelines pass their per-image generators, which decoding ignores; as arguments of a compiled
        # call they would be guarded on and recompile every batch.
        return decode(z, return_dict=return_dict)

    vae.decode = decode_without_generator


def _speed_up_unet(unet, device: str, *, compile_: bool):
    import torch
    import torch._inductor.config as inductor

    if not (compile_ and device.startswith("cuda")):
        return unet
    inductor.conv_1x1_as_mm = True  # proj_in/proj_out and shortcut 1x1 convolutions become plain matmuls
    _fuse_qkv(unet)
    return torch.compile(unet.to(memory_format=torch.channels_last))


def _fuse_qkv(model) -> None:
    """One matmul for attention's Q, K and V projections (K and V for cross-attention), where supported."""
    fuse = getattr(model, "fuse_qkv_projections", None)
    if fuse is None or any(getattr(m, "fused_projections", False) for m in model.modules()):
        return  # not supported, or fused already (a pipeline wrapped twice)
    try:
        fuse()
    except ValueError:  # added-KV attention (some SDXL variants) cannot be fused
        return


def _hub_revision(repo_id: str) -> str | None:
    """The commit of the cached snapshot diffusers loaded (read from the cache path)."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, "model_index.json")
    if isinstance(path, str) and "/snapshots/" in path:
        return path.split("/snapshots/")[1].split("/")[0]
    return None


def _hash_weights(path: Path) -> str:
    """sha256 over a checkpoint file, or over a folder's weight files (relative name and bytes)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()
