"""Tiny offline Stable Diffusion pipelines for tests and the demo, built from configs, cached once.

The UNets (txt2img/img2img: 4 input channels; inpainting: 9) and the text encoder have random,
seeded weights: text-to-image output is structured noise, and says nothing about any real model.
The VAE is different: a random VAE destroys every image, which would make img2img meaningless. So
the tiny VAE (2x down-sampling, 4 latent channels) is fitted for a few hundred steps to reconstruct
natural-image patches from photos that scikit-image and scikit-learn ship. The photos the demo edits
(``HELD_OUT``: astronaut, coffee, cat, camera) are kept out of the fit, so a faithful img2img at low strength
shows a general codec at work, not a memorized photo. The tokenizer is CLIP's real BPE, built from
the vocabulary file that open_clip ships in its wheel.

The cache folder (``$DIFFAUDIT_CACHE`` or ``~/.cache/diffaudit``) holds ``tiny-v<VERSION>/`` with a
``base`` and an ``inpaint`` diffusers folder. It is built in a temp folder and renamed into place under a
file lock, so a half-built cache is never used.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

VERSION = 2
SEED = 1234
SIZE = 64  # default image size of the tiny pipelines (latents are SIZE / 2)
STEPS = 10  # default steps: enough that img2img at strength 0.1 still takes one step
GUIDANCE = 5.0
HELD_OUT = ("astronaut", "coffee", "cat", "camera")
TRAIN_RGB = ("chelsea", "rocket", "immunohistochemistry", "retina", "hubble_deep_field", "colorwheel")
TRAIN_GRAY = ("coins", "moon", "clock", "grass", "gravel", "brick", "page", "text", "cell")
FIT_STEPS = 400
FIT_BATCH = 16
FIT_CROP = 32
MARKER = "diffaudit-tiny.json"


def cache_root() -> Path:
    """Where diffaudit caches built models: ``$DIFFAUDIT_CACHE`` or ``~/.cache/diffaudit``."""
    env = os.environ.get("DIFFAUDIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "diffaudit"


def tiny_dir() -> Path:
    return cache_root() / f"tiny-v{VERSION}"


def ensure_tiny(progress: bool = False) -> Path:
    """The tiny model folder, built on first use (atomically, under a lock) and reused after."""
    final = tiny_dir()
    if (final / MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".tiny-v{VERSION}.lock"):
        if (final / MARKER).is_file():  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".tiny-v{VERSION}-", dir=final.parent))
        try:
            _build(tmp, progress=progress)
            if final.exists():  # a folder without its marker is a leftover: never trust it
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- components -------------------------------------------------------------------------------

def clip_tokenizer():
    """CLIP's tokenizer (49,408 tokens) from the BPE merges that open_clip ships in its wheel."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    units = list(_bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(cfg)


def _unet(in_channels: int):
    from diffusers import UNet2DConditionModel

    # (16, 32) channels: 0.16 GFLOP per image and step, 4x less than (32, 64), so the demo stays quick on a CPU.
    return UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, mid_block_add_attention=False, sample_size=SIZE)


def _scheduler():
    from diffusers import DDIMScheduler

    # Stable Diffusion's noise schedule.
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


# --- VAE fit ----------------------------------------------------------------------------------

def _photos(names: tuple[str, ...]) -> list[np.ndarray]:
    """Photos as float32 HxWx3 in [-1, 1] (grey ones repeated on 3 channels)."""
    import skimage.data

    out = []
    for name in names:
        a = np.asarray(getattr(skimage.data, name)())
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        out.append(a[..., :3].astype(np.float32) / 127.5 - 1.0)
    return out


def _training_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    photos = _photos(TRAIN_RGB) + _photos(TRAIN_GRAY)
    photos += [np.asarray(i).astype(np.float32) / 127.5 - 1.0 for i in load_sample_images().images]
    return photos


def _patch_sampler(photos: list[np.ndarray], rng: np.random.Generator):
    """Random crops of photos resized so their short side is 40-256 px: the tiny model's scales."""
    import torch
    import torch.nn.functional as F

    pyramid = []
    tensors = [torch.from_numpy(p).permute(2, 0, 1)[None] for p in photos]
    for t in tensors:
        short = min(t.shape[-2:])
        for target in (40, 64, 96, 160, 256):
            if target <= short:
                s = target / short
                size = (max(FIT_CROP, round(t.shape[-2] * s)), max(FIT_CROP, round(t.shape[-1] * s)))
                pyramid.append(F.interpolate(t, size=size, mode="area"))

    def sample(n: int) -> torch.Tensor:
        crops = []
        for k in rng.integers(0, len(pyramid), n):
            img = pyramid[k]
            y = rng.integers(0, img.shape[-2] - FIT_CROP + 1)
            x = rng.integers(0, img.shape[-1] - FIT_CROP + 1)
            crop = img[..., y:y + FIT_CROP, x:x + FIT_CROP]
            crops.append(crop.flip(-1) if rng.random() < 0.5 else crop)
        return torch.cat(crops)

    return sample


def fit_vae(vae, steps: int = FIT_STEPS, progress: bool = False) -> dict[str, float]:
    """Fit the VAE to reconstruct photo patches (MSE on a sampled latent, tiny KL); set its latent scale."""
    import torch

    rng = np.random.default_rng(SEED)
    sample = _patch_sampler(_training_photos(), rng)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(SEED)
    bar = _bar(steps, "fitting tiny VAE", progress)
    vae.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        x = sample(FIT_BATCH)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(gen)).sample
        loss = torch.mean((rec - x) ** 2) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(sample(64)).latent_dist.mode()
        scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    return {"final_mse": float(loss.item()), "scaling_factor": scale}


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


# --- build ------------------------------------------------------------------------------------

def _build(folder: Path, progress: bool) -> None:
    """Build both pipelines into ``folder`` (deterministic: fixed seeds, one thread)."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        with torch.random.fork_rng():  # seed our build without touching the caller's random state
            torch.manual_seed(SEED)
            text_encoder, unet, inpaint_unet, vae = _text_encoder(), _unet(4), _unet(9), _vae()
            fit = fit_vae(vae, progress=progress)
    finally:
        torch.set_num_threads(threads)
    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), scheduler=_scheduler(),
                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    StableDiffusionPipeline(unet=unet, **common).save_pretrained(folder / "base")
    StableDiffusionInpaintPipeline(unet=inpaint_unet, **common).save_pretrained(folder / "inpaint")
    marker = {"version": VERSION, "seed": SEED, "held_out": HELD_OUT, "fit_steps": FIT_STEPS,
              "build_seconds": round(time.perf_counter() - start, 1), **fit}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
