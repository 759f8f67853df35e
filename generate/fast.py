"""The fast generation path: what it picks, and the pieces that change no pixel beyond rounding.

Exact mode (the default on CUDA; ``--no-fast`` turns it off) keeps images equal to plain diffusers eager
fp16 within 1/255 per channel:
- **attention backend** measured at start-up on the UNet's largest attention shape among cuDNN, Flash and
  memory-efficient SDPA (an H100 gave 2.34 / 4.52 / 8.37 ms); a backend whose output strays from the math
  kernel by more than ``ATTENTION_TOLERANCE`` is not chosen;
- **bucketed batch sizes** (``batch_buckets``), so a short batch is padded to one of a few shapes and CUDA
  graphs (or compiled kernels) are reused instead of re-made;
- **CUDA graphs** of the UNet per bucket (``GraphedUNet``), which replay the same kernels as eager, checked
  against eager on the first call and dropped with the reason recorded if they disagree or cannot capture;
- VAE decode and PNG work overlapped with the next batch (``generate.runner``), into **pinned host buffers**
  reused across batches (``PinnedPool``);
- **batch size auto-tuned** from the card's free memory and a measured per-image cost (``choose_batch``).

Approximate modes change pixels and run only when asked (``--approximate deepcache`` / ``fp8``), each
behind a fidelity gate (``generate.fidelity``): ``DeepCache`` (Ma, Fang, Wang, CVPR 2024: reuse the deep
UNet features between full steps) and FP8 linear layers via torchao on GPUs of compute capability 8.9+.

Nothing here is measured on a GPU in this repository's tests (CI has none): the logic is tested on the CPU
with fake timers and the tiny model; ``bench/h200.py`` (one prepared script) measures the speed and the pixels on a GPU.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from diffaudit.errors import ConfigError

BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")
ATTENTION_TOLERANCE = 2e-2  # max |out - math kernel| in fp16 on unit-variance inputs; measured values ~1e-3
APPROXIMATIONS = ("deepcache", "fp8")
GIB = 2**30


# --- attention backend -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackendChoice:
    """The attention backend picked, with every candidate's median time (seconds) or why it was not used."""

    backend: str | None  # an SDPBackend name; None: leave PyTorch's own choice
    timings: dict[str, float | str]

    def context(self):
        """A context manager that makes SDPA use the chosen backend (a no-op without one)."""
        if self.backend is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, self.backend)])


def choose_backend(run: Callable[[str], Any], *, candidates: Sequence[str] = BACKENDS,
                   check: Callable[[str, Any], bool] | None = None, timer: Callable[[], float] | None = None,
                   sync: Callable[[], None] = lambda: None, reps: int = 5) -> BackendChoice:
    """Time ``run(backend)`` ``reps`` times per candidate (after one warm-up call) and pick the fastest median.
    A candidate that raises, or whose warm-up output ``check`` rejects, is skipped with the reason."""
    import time

    timer = timer or time.perf_counter
    timings: dict[str, float | str] = {}
    for name in candidates:
        try:
            out = run(name)
            sync()
            if check is not None and not check(name, out):
                timings[name] = "rejected: output differs from the math kernel"
                continue
            samples = []
            for _ in range(reps):
                t0 = timer()
                run(name)
                sync()
                samples.append(timer() - t0)
            timings[name] = statistics.median(samples)
        except (RuntimeError, ValueError, AttributeError) as e:  # kernel unavailable for this shape/GPU/build
            timings[name] = f"unavailable: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}"
    usable = {k: v for k, v in timings.items() if isinstance(v, float)}
    return BackendChoice(min(usable, key=usable.get) if usable else None, timings)


def measure_attention(unet, batch: int, height: int, width: int, vae_scale: int, device: str, dtype) -> BackendChoice:
    """``choose_backend`` on the UNet's largest self-attention (the first attention block: full latent
    resolution), with CFG's doubled batch; each backend checked against the math kernel."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, dim = _first_attention_shape(unet)
    tokens = (height // vae_scale) * (width // vae_scale)
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(2 * batch, heads, tokens, dim, device=device, dtype=dtype, generator=gen) for _ in range(3))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q, k, v)

    def run(name: str):
        with sdpa_kernel([getattr(SDPBackend, name)]):
            return F.scaled_dot_product_attention(q, k, v)

    def check(name: str, out) -> bool:
        return float((out.float() - ref.float()).abs().max()) <= ATTENTION_TOLERANCE

    return choose_backend(run, check=check, sync=torch.cuda.synchronize)


def _first_attention_shape(unet) -> tuple[int, int]:
    """(heads, head_dim) of the UNet's first self-attention (the one at full latent resolution)."""
    for m in unet.modules():
        if type(m).__name__ == "Attention" and not getattr(m, "is_cross_attention", False):
            inner = m.to_q.out_features if hasattr(m, "to_q") else m.inner_dim
            return m.heads, inner // m.heads
    raise ConfigError("the UNet has no self-attention block to measure")


# --- bucketed batch shapes ---------------------------------------------------------------------------------

def batch_buckets(max_batch: int, levels: int = 4) -> tuple[int, ...]:
    """A few batch sizes that every batch is padded up to: ``max_batch`` and its halvings (at most ``levels``),
    so graphs and compiled kernels are made for at most ``levels`` shapes and a short batch wastes less
    than half of its bucket once it is above ``max_batch / 2**(levels-1)``."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    sizes = {max(1, math.ceil(max_batch / 2**k)) for k in range(levels)}
    return tuple(sorted(sizes))


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` images (the largest bucket if ``n`` exceeds them all)."""
    for b in sorted(buckets):
        if b >= n:
            return b
    return max(buckets)


# --- batch size across cards ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchPlan:
    batch: int
    reason: str


def choose_batch(*, free_bytes: float, per_image_bytes: float, width: int, height: int, headroom: float = 0.85,
                 cap_at_512: int = 32, floor: int = 1) -> BatchPlan:
    """The largest batch whose measured per-image memory (UNet activations with CFG plus the overlapped VAE
    decode) fits ``headroom`` of the free memory, capped where throughput stops growing (32 images at 512x512
    on an H100, scaled by area: larger batches only add latency and memory)."""
    if per_image_bytes <= 0:
        raise ValueError("per_image_bytes must be positive")
    cap = max(1, cap_at_512 * 512 * 512 // (width * height))
    fits = int(free_bytes * headroom // per_image_bytes)
    batch = max(floor, min(cap, fits))
    why = (f"{fits} images fit {headroom:.0%} of {free_bytes / GIB:.1f} GiB free at {per_image_bytes / GIB:.2f} "
           f"GiB each; throughput plateau cap {cap}")
    return BatchPlan(batch, why)


def measure_per_image_bytes(call: Callable[[int], Any], small: int = 1, large: int = 4) -> float:
    """Peak CUDA memory of ``call(n)`` at two batch sizes: the slope is the per-image cost (weights and
    workspace cancel out)."""
    import torch

    peaks = []
    for n in (small, large):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call(n)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    return max(1.0, (peaks[1] - peaks[0]) / (large - small))


# --- pinned host buffers -------------------------------------------------------------------------------------

class PinnedPool:
    """Host buffers reused across batches: page-locked allocation costs milliseconds per megabyte, and a
    run writes the same shape over and over. ``acquire`` hands out a free buffer of the shape (or makes one),
    ``release`` returns it once the PNG writers are done with it."""

    def __init__(self, pin: bool = True, keep: int = 4):
        self.pin, self.keep = pin, keep
        self._free: dict[tuple, list] = {}
        self._lock = threading.Lock()
        self.allocated = 0

    def acquire(self, shape: tuple[int, ...], dtype=None):
        import torch

        dtype = dtype or torch.uint8
        key = (tuple(shape), dtype)
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
            self.allocated += 1
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def release(self, buf) -> None:
        with self._lock:
            free = self._free.setdefault((tuple(buf.shape), buf.dtype), [])
            if len(free) < self.keep:
                free.append(buf)


# --- CUDA graphs -----------------------------------------------------------------------------------------------

@dataclass
class _Graph:
    graph: Any
    inputs: list  # static tensors the replay reads
    output: Any


@dataclass
class GraphedUNet:
    """Replays a CUDA graph of ``unet.forward`` per input signature (shapes, dtypes and the non-tensor
    arguments): inputs are copied into static buffers, the graph replays the kernels eager would launch, and
    the output is cloned (schedulers keep model outputs across steps). The first call of each signature is
    compared with eager; a mismatch or a failed capture leaves that signature eager and says why."""

    unet: Any
    tolerance: float = 1e-2
    pool: Any = None
    graphs: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)
    _eager: Any = None

    def install(self) -> GraphedUNet:
        import torch

        self._eager = self.unet.forward
        self.pool = torch.cuda.graph_pool_handle()
        self.unet.forward = self.forward
        return self

    def uninstall(self) -> None:
        if self._eager is not None:
            self.unet.forward = self._eager
            self._eager = None

    def forward(self, *args, **kwargs):
        import torch

        flat, spec = _flatten((args, kwargs))
        key = _signature(flat, spec)
        if key in self.failed or torch.is_grad_enabled():
            return self._eager(*args, **kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            return self._capture(key, flat, spec, args, kwargs)
        for static, value in zip(entry.inputs, [v for v in flat if isinstance(v, torch.Tensor)], strict=True):
            static.copy_(value)
        entry.graph.replay()
        return _clone(entry.output)

    def _capture(self, key, flat, spec, args, kwargs):
        import torch

        eager = self._eager(*args, **kwargs)
        try:
            static = [v.clone() if isinstance(v, torch.Tensor) else v for v in flat]
            s_args, s_kwargs = _unflatten(static, spec)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy initialisation and cuDNN/cuBLAS workspaces outside the capture
                    self._eager(*s_args, **s_kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._eager(*s_args, **s_kwargs)
            graph.replay()
            diff = _max_diff(out, eager)
            if not diff <= self.tolerance:
                self.failed[key] = f"replay differs from eager by {diff:.3g}"
                return eager
            self.graphs[key] = _Graph(graph, [v for v in static if isinstance(v, torch.Tensor)], out)
        except RuntimeError as e:
            self.failed[key] = f"capture failed: {str(e).splitlines()[0][:160] if str(e) else 'RuntimeError'}"
        return eager


def _flatten(obj) -> tuple[list, Any]:
    """Leaves of nested tuples/lists/dicts, and a spec to rebuild them."""
    if isinstance(obj, (tuple, list)):
        parts = [_flatten(o) for o in obj]
        return [v for p in parts for v in p[0]], (type(obj), [p[1] for p in parts])
    if isinstance(obj, dict):
        keys = sorted(obj)
        parts = [_flatten(obj[k]) for k in keys]
        return [v for p in parts for v in p[0]], (dict, keys, [p[1] for p in parts])
    return [obj], None


def _unflatten(leaves: list, spec) -> Any:
    it = iter(leaves)

    def build(s):
        if s is None:
            return next(it)
        if s[0] is dict:
            return {k: build(sub) for k, sub in zip(s[1], s[2], strict=True)}
        return s[0](build(sub) for sub in s[1])

    return build(spec)


def _signature(flat: list, spec) -> tuple:
    import torch

    sig = []
    for v in flat:
        if isinstance(v, torch.Tensor):
            sig.append(("t", tuple(v.shape), str(v.dtype), str(v.device)))
        else:
            sig.append(("v", repr(v)))
    return (repr(spec), tuple(sig))


def _clone(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone(o) for o in out)
    if hasattr(out, "sample"):
        return type(out)(sample=out.sample.clone())
    return out


def _max_diff(a, b) -> float:
    import torch

    ta = a if isinstance(a, torch.Tensor) else (a[0] if isinstance(a, tuple) else a.sample)
    tb = b if isinstance(b, torch.Tensor) else (b[0] if isinstance(b, tuple) else b.sample)
    return float((ta.float() - tb.float()).abs().max())


# --- DeepCache-style feature reuse (approximate) ---------------------------------------------------------

class DeepCache:
    """Ma, Fang, Wang, "DeepCache: Accelerating Diffusion Models for Free" (CVPR 2024): the UNet's deep
    features change slowly between adjacent denoising steps, so on every ``interval``-th UNet call of a
    pipeline call the UNet runs whole and the output of its second-to-last up block is kept; on the calls in
    between only the shallow path runs (``conv_in``, the first down block, the last up block, ``conv_out``)
    with that cached feature. Pixels change: opt-in only, behind the fidelity gate.

    Installed by wrapping the skipped blocks' ``forward`` for the duration of one pipeline call (a context
    manager), so diffusers' own UNet forward is used unchanged."""

    def __init__(self, unet, interval: int = 3):
        if interval < 1:
            raise ConfigError(f"deepcache interval must be >= 1 (got {interval})")
        self.unet, self.interval = unet, interval
        self.calls = 0
        self.full_calls = 0
        self._cached = None
        self._res_counts: dict[int, int] = {}
        self._saved: list[tuple[Any, Any]] = []
        self._hook = None

    @property
    def full(self) -> bool:
        return (self.calls - 1) % self.interval == 0

    def __enter__(self) -> DeepCache:
        unet = self.unet
        if len(unet.down_blocks) < 2 or len(unet.up_blocks) < 2:
            raise ConfigError("deepcache needs a UNet with at least two down and two up blocks")
        self.calls, self._cached = 0, None
        self._hook = unet.register_forward_pre_hook(self._count)
        for i, block in enumerate(unet.down_blocks[1:], start=1):
            self._wrap(block, self._down(i, block.forward))
        if unet.mid_block is not None:
            self._wrap(unet.mid_block, self._passthrough(unet.mid_block.forward))
        last = len(unet.up_blocks) - 2
        for i, block in enumerate(unet.up_blocks[:-1]):
            self._wrap(block, self._up(block.forward, keep=i == last))
        return self

    def __exit__(self, *exc) -> None:
        for module, forward in self._saved:
            if forward is None:
                del module.forward
            else:
                module.forward = forward
        self._saved.clear()
        if self._hook is not None:
            self._hook.remove()
        self._cached = None

    def _count(self, module, args) -> None:
        self.calls += 1
        if self.full:
            self.full_calls += 1

    def _wrap(self, module, forward) -> None:
        self._saved.append((module, module.__dict__.get("forward")))
        module.forward = forward

    def _down(self, i: int, forward):
        def run(*args, **kwargs):
            if self.full or self._cached is None:
                hidden, res = forward(*args, **kwargs)
                self._res_counts[i] = len(res)
                return hidden, res
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            return hidden, (hidden,) * self._res_counts[i]  # placeholders: only skipped up blocks read them

        return run

    def _passthrough(self, forward):
        def run(*args, **kwargs):
            if self.full or self._cached is None:
                return forward(*args, **kwargs)
            return kwargs.get("hidden_states", args[0] if args else None)

        return run

    def _up(self, forward, keep: bool):
        def run(*args, **kwargs):
            if self.full or self._cached is None:
                out = forward(*args, **kwargs)
                if keep:
                    self._cached = out
                return out
            return self._cached if keep else kwargs.get("hidden_states", args[0] if args else None)

        return run


# --- FP8 (approximate) -----------------------------------------------------------------------------------------

def apply_fp8(unet, device: str) -> str:
    """FP8 weights and dynamic FP8 activations for the UNet's linear layers (torchao), on GPUs of compute
    capability 8.9 or later (Ada, Hopper). Returns a description; raises ``ConfigError`` where it cannot run."""
    import torch

    if not device.startswith("cuda"):
        raise ConfigError("--approximate fp8 needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper)")
    cap = torch.cuda.get_device_capability(torch.device(device))
    if cap < (8, 9):
        raise ConfigError(f"--approximate fp8 needs compute capability 8.9+; this GPU has {cap[0]}.{cap[1]}")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise ConfigError(f"--approximate fp8 needs torchao (pip install 'torchao==0.18.0'): {e}") from None
    quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda m, _: isinstance(m, torch.nn.Linear) and m.in_features % 16 == 0
              and m.out_features % 16 == 0)
    return "torchao Float8DynamicActivationFloat8WeightConfig (per-row) on the UNet's linear layers"


def check_approximations(names: Sequence[str]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in APPROXIMATIONS]
    if unknown:
        raise ConfigError(f"unknown approximation(s) {unknown}; choose from: {', '.join(APPROXIMATIONS)}")
    return tuple(dict.fromkeys(names))


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    yield
