"""Wen et al.'s memorization score, recorded while generating, at no extra UNet evaluation.

Wen, Liu, Chen, Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models" (ICLR 2024):
the magnitude of the text-conditional noise prediction, ``|| eps(x_t, c) - eps(x_t, empty) ||_2`` over an
image's whole latent, is abnormally large at the first denoising steps when a prompt makes the model
reproduce a training image. With classifier-free guidance every pipeline already evaluates both
predictions in one UNet call (the batch is ``[uncond; text]``), so a forward hook on the UNet sees both
halves and the score costs one subtraction and one norm per step, on the device, with no host sync until
the batch ends.

The score is Wen et al.'s only where the unconditional half is the empty prompt: images with a negative
prompt get no score (null), and so do calls without guidance (``guidance <= 1``: one half only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The mean is taken over the first MEAN_STEPS UNet calls (Wen et al. show the first step alone already
# separates memorized prompts; the mean over the first few steps is steadier). Schedulers of order 2
# (Heun) call the UNet twice per step: the count is of UNet calls, as the hook sees them.
MEAN_STEPS = 10
COLUMNS = ("mem_score_step1", "mem_score_mean", "mem_score_steps")


@dataclass
class Scores:
    """Per image of a batch: the step-1 score and the mean over the first ``steps`` UNet calls (NaN: no
    score). ``norms`` is a (steps, n) array, or a host tensor still arriving from the GPU until ``ready``
    has fired; ``index`` selects images of the batch (a padded batch drops its padding)."""

    norms: Any
    valid: np.ndarray
    ready: Any = None
    index: slice = field(default_factory=lambda: slice(None))

    @property
    def steps(self) -> int:
        return int(self.norms.shape[0])

    def selected(self) -> tuple[np.ndarray, np.ndarray]:
        """The selected images' (steps, n) norms in float64 and their validity, on the host."""
        if self.ready is not None:
            self.ready.synchronize()  # releases the GIL; fires once the copy behind the UNet calls landed
            self.ready = None
        return np.asarray(self.norms, dtype=np.float64)[:, self.index], self.valid[self.index]

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        """(step1, mean) per selected image; NaN where there is no score."""
        norms, valid = self.selected()
        if norms.shape[0] == 0:
            nan = np.full(len(valid), np.nan)
            return nan, nan.copy()
        step1, mean = norms[0].copy(), norms.mean(axis=0)
        step1[~valid] = mean[~valid] = np.nan
        return step1, mean

    def rows(self, n: int | None = None) -> list[dict[str, Any]]:
        """Table cells per selected image (None where there is no score)."""
        step1, mean = self.values()
        out = []
        for k in range(len(step1) if n is None else n):
            ok = bool(np.isfinite(step1[k]))
            out.append({"mem_score_step1": float(step1[k]) if ok else None,
                        "mem_score_mean": float(mean[k]) if ok else None,
                        "mem_score_steps": self.steps if ok else None})
        return out

    def __getitem__(self, index: slice) -> Scores:
        n = len(self.valid)
        picked = range(n)[self.index][index]
        return Scores(self.norms, self.valid, self.ready, slice(picked.start, picked.stop, picked.step))

    @staticmethod
    def none(n: int) -> Scores:
        return Scores(np.zeros((0, n)), np.zeros(n, bool))

    @staticmethod
    def concat(parts: list[Scores]) -> Scores:
        """One batch's scores from the parts it was split into (after an out-of-memory halving)."""
        picked = [p.selected() for p in parts]
        steps = max(n.shape[0] for n, _ in picked)
        norms = [n if n.shape[0] == steps else np.full((steps, n.shape[1]), np.nan) for n, _ in picked]
        valid = [v & (n.shape[0] == steps) for n, v in picked]
        return Scores(np.concatenate(norms, axis=1), np.concatenate(valid))


def text_noise_norm(uncond, text):
    """``|| text - uncond ||_2`` per image over (C, H, W), in float32 (the definition, in one place)."""
    return (text.float() - uncond.float()).flatten(1).norm(dim=1)


class ScoreRecorder:
    """A forward hook on a UNet that keeps, for the first ``mean_steps`` CFG calls of a batch of ``n``
    images, the per-image norm of (text - uncond) halves. Use as a context manager around one pipeline call.

    ``valid`` marks the images whose unconditional half is the empty prompt (others are reported NaN).
    """

    def __init__(self, unet, n: int, valid: Sequence[bool] | None = None, mean_steps: int = MEAN_STEPS):
        self.unet, self.n, self.mean_steps = unet, n, mean_steps
        self.valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
        self.norms: list[Any] = []  # device tensors, one (n,) per recorded call
        self.calls = 0
        self._handle = None

    def __enter__(self) -> ScoreRecorder:
        self._handle = self.unet.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module, args, output) -> None:
        self.calls += 1
        if len(self.norms) >= self.mean_steps:
            return
        sample = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        if sample.shape[0] != 2 * self.n:  # no CFG (or a call we do not understand): no score
            return
        uncond, text = sample.detach().chunk(2)
        self.norms.append(text_noise_norm(uncond, text))

    def scores(self) -> Scores:
        """Per-image scores. On CUDA the copy to the host is queued behind the UNet calls it needs and read
        only when the rows are written (``Scores.rows``), so the recorder adds no sync to the batch."""
        if not self.norms:
            return Scores.none(self.n)
        import torch

        norms = torch.stack(self.norms)  # (steps, n)
        if not norms.is_cuda:
            return Scores(norms.numpy(), self.valid)
        host = torch.empty(norms.shape, dtype=norms.dtype, pin_memory=True)
        host.copy_(norms, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(norms.device))
        return Scores(host.numpy(), self.valid, ready)  # the array keeps the pinned tensor alive
