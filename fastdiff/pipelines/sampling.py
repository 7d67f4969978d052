"""Sampling fastdiff's class-conditional pipelines reproducibly, with any scheduler, counting model evaluations.

* :data:`SCHEDULERS` names the diffusers schedulers the command line offers (a plain dict, no class-from-string).
* :func:`sample_pipeline` draws ``num_samples`` images; image ``i`` depends only on ``(seed, i)`` (its own generator), so a
  seed gives the same images whatever the batch size. It also returns the NFE: model calls per image, a classifier-free
  guided call (conditional and unconditional in one batch) counting once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastdiff.errors import InputError, check_choice

__all__ = ["SCHEDULERS", "FASTDIFF_SCHEDULERS", "make_scheduler", "sample_pipeline", "Samples", "image_seed"]


def _diffusers(name: str, **overrides: Any) -> Callable[[dict], Any]:
    def build(config: dict) -> Any:
        import diffusers

        return getattr(diffusers, name).from_config(config, **overrides)

    return build


def _fastdiff(name: str, **overrides: Any) -> Callable[[dict], Any]:
    def build(config: dict) -> Any:
        from fastdiff.samplers import diffusers as schedulers

        return getattr(schedulers, name).from_config(config, **overrides)

    return build


SCHEDULERS: dict[str, Callable[[dict], Any]] = {
    "ddim": _diffusers("DDIMScheduler"),
    "ddpm": _diffusers("DDPMScheduler"),
    "euler": _diffusers("EulerDiscreteScheduler"),
    "euler-ancestral": _diffusers("EulerAncestralDiscreteScheduler"),
    "heun": _diffusers("HeunDiscreteScheduler"),
    "dpmpp-2m": _diffusers("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2),
    "unipc": _diffusers("UniPCMultistepScheduler"),
    "pndm": _diffusers("PNDMScheduler", skip_prk_steps=True),  # PLMS as in Stable Diffusion: N steps cost N + 1 calls
    # fastdiff's own (fastdiff.samplers.diffusers)
    "ghvb": _fastdiff("GHVBScheduler"),  # the paper's GHVB 3.8: order 4, beta 0.8
    "ghvb-1.8": _fastdiff("GHVBScheduler", solver_order=2, momentum=0.8),  # best all-round in `fastdiff bench samplers`
    "hb-plms": _fastdiff("HeavyBallPLMSScheduler"),
    "nt-plms": _fastdiff("NesterovPLMSScheduler"),
    "unipc-hb": _fastdiff("UniPCHeavyBallScheduler"),
    "hb-dpmpp-2m": _fastdiff("HeavyBallDPMSolverScheduler"),
    "ipndm": _fastdiff("IPNDMScheduler"),
    "ipndm-v": _fastdiff("IPNDMScheduler", solver="ipndm-v"),  # variable-step weights: order 4 on any grid
    "plms": _fastdiff("PLMSScheduler"),
    "s-pndm": _fastdiff("SPNDMScheduler"),
    "f-pndm": _fastdiff("FPNDMScheduler"),
}
FASTDIFF_SCHEDULERS = ("ghvb", "ghvb-1.8", "hb-plms", "nt-plms", "hb-dpmpp-2m", "unipc-hb", "ipndm", "ipndm-v", "plms", "s-pndm", "f-pndm")


def make_scheduler(name: str, config: dict, **overrides: Any) -> Any:
    """The scheduler ``name`` (see :data:`SCHEDULERS`) built from another scheduler's ``config``, with ``overrides``
    of its own config (e.g. GHVB's ``solver_order`` and ``momentum``)."""
    check_choice("scheduler", name, SCHEDULERS)
    scheduler = SCHEDULERS[name](config)
    return type(scheduler).from_config(scheduler.config, **overrides) if overrides else scheduler


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` in a run seeded ``seed`` (distinct across seeds and indices)."""
    return (seed * 1_000_003 + index) % (2**63)


@dataclass
class Samples:
    images: Tensor  # (N, C, H, W) float in [-1, 1] scale, not clipped
    labels: Tensor  # (N,) class labels (num_classes = unconditional)
    nfe: float  # model evaluations per image


@torch.no_grad()
def sample_pipeline(
    pipe: Any,
    num_samples: int,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 250,
    class_labels: Tensor | None = None,
    progress: bool = False,
    first_index: int = 0,
    schedule: dict | None = None,
) -> Samples:
    """Draw ``num_samples`` images from a :class:`~fastdiff.pipelines.class_conditional.ClassConditionalPipeline`.

    Labels default to ``0, 1, ..., num_classes - 1`` repeated (balanced classes). Returns the raw samples (before
    clipping, so divergence can be measured) and the NFE per image. ``schedule``: a custom grid (``{"timesteps": ...,
    "sigmas": ...}``, e.g. an optimised schedule file's) for the scheduler. Image ``i`` is drawn from the seed of
    ``first_index + i`` (:func:`image_seed`), so a run cut into pieces (reflow's pair shards) gives the same images.
    """
    from tqdm.auto import tqdm

    if num_samples < 1 or batch_size < 1 or num_inference_steps < 1:
        raise InputError(f"num_samples, batch_size and steps must be >= 1; got {num_samples}, {batch_size}, {num_inference_steps}")
    labels = torch.arange(num_samples) % pipe.num_classes if class_labels is None else torch.as_tensor(class_labels)
    if labels.shape != (num_samples,):
        raise InputError(f"need one class label per sample ({num_samples}); got {tuple(labels.shape)}")
    calls = [0]
    handle = pipe.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    images, batches = [], 0
    try:
        for start in tqdm(range(0, num_samples, batch_size), desc="sampling", disable=not progress, leave=False):
            idx = range(start, min(start + batch_size, num_samples))
            gens = [torch.Generator(pipe.device).manual_seed(image_seed(seed, first_index + i)) for i in idx]
            grid = {k: (schedule or {}).get(k) for k in ("timesteps", "sigmas")} if schedule else {}
            out = pipe(labels[idx.start : idx.stop], num_inference_steps, guidance_scale, gens, output_type="latent", **grid)
            images.append(out.images.float().cpu())
            batches += 1
    finally:
        handle.remove()
    return Samples(torch.cat(images), labels, calls[0] / batches)
