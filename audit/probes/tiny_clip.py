"""A tiny open_clip model with random weights, for tests and offline demos (meaningless labels).

Its architecture is one JSON config (``model_configs/diffaudit-tiny-clip.json``) registered with
open_clip's own registry, so it is built by ``open_clip.create_model`` and tokenized by open_clip's
tokenizer (whose BPE vocabulary ships in the wheel) like any other model. Weights are drawn from a
fixed seed, so the same tiny model comes back every time, in milliseconds, without a cache.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

NAME = "diffaudit-tiny-clip"
CONFIG = Path(__file__).with_name("model_configs") / f"{NAME}.json"
SEED = 0


def register() -> str:
    """Add the tiny config to open_clip's model registry (idempotent) and return its name."""
    import open_clip

    if NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG)
    return NAME


def create_tiny_clip(device: str | torch.device = "cpu") -> torch.nn.Module:
    """The tiny CLIP with seeded random weights, in eval mode on ``device`` (global RNG untouched)."""
    import open_clip

    quiet = _RandomInitIsTheIntent()
    logging.getLogger().addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = open_clip.create_model(register(), pretrained=None, device="cpu")
    finally:
        logging.getLogger().removeFilter(quiet)
    return model.to(device).eval()


class _RandomInitIsTheIntent(logging.Filter):
    """Hides open_clip's "initialized randomly" warning, which for this model is the point."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()
