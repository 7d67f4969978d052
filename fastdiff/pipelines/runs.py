"""A pipeline run as the command line and scripts share it: open a pipeline folder with a scheduler and a feature
cache, cycle class labels, and save the samples to a folder (a preview grid and every image in an ``.npz``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastdiff.errors import InputError
from fastdiff.pipelines.sampling import Samples

__all__ = ["SampleSettings", "PREVIEW", "open_pipeline", "cycle_labels", "draw", "save_samples", "sample_files", "check_out_folder"]

PREVIEW = 100  # images shown in grid.png at most: a 10 x 10 preview; samples.npz holds them all


@dataclass(frozen=True)
class SampleSettings:
    """How a pipeline is sampled: image ``i`` depends only on ``(seed, i)``, not on ``batch_size``."""

    num_samples: int = 64
    steps: int = 20
    guidance_scale: float = 1.0
    seed: int = 0
    batch_size: int = 250


def open_pipeline(folder: str | Path, scheduler: str | None = None, cache: str | None = None) -> Any:
    """Load a class-conditional pipeline folder, swap in the scheduler named ``scheduler`` (see
    :data:`~fastdiff.pipelines.sampling.SCHEDULERS`; default: the folder's) and apply the feature-cache spec ``cache``."""
    from fastdiff.pipelines.class_conditional import load_pipeline
    from fastdiff.pipelines.sampling import make_scheduler

    pipe = load_pipeline(folder)
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    if cache:
        from fastdiff.cache import apply_cache_spec, cached_model

        apply_cache_spec(cached_model(pipe), cache)
    return pipe


def cycle_labels(classes: Sequence[int], num_samples: int) -> Tensor:
    """``classes`` repeated in turn until there is one label per sample: ``([3, 4], 5)`` -> ``[3, 4, 3, 4, 3]``."""
    if not classes:
        raise InputError("give at least one class label, e.g. --classes 0,7")
    labels = torch.tensor(list(classes))
    return labels.repeat(-(-num_samples // len(labels)))[:num_samples]


def draw(pipe: Any, settings: SampleSettings, labels: Tensor | None = None, progress: bool = False, schedule: dict | None = None) -> Samples:
    """:func:`~fastdiff.pipelines.sampling.sample_pipeline` with ``settings`` (and a custom grid ``schedule``)."""
    from fastdiff.pipelines.sampling import sample_pipeline

    s = settings
    return sample_pipeline(pipe, s.num_samples, s.steps, s.guidance_scale, s.seed, s.batch_size, labels, progress=progress, schedule=schedule)


def sample_files(out: str | Path) -> tuple[Path, Path]:
    """The files :func:`save_samples` writes into ``out``: ``grid.png`` and ``samples.npz``."""
    return Path(out) / "grid.png", Path(out) / "samples.npz"


def check_out_folder(out: str | Path, overwrite: bool) -> None:
    """An error if ``out`` already holds the files :func:`save_samples` writes, unless ``overwrite``."""
    if any(p.exists() for p in sample_files(out)) and not overwrite:
        raise InputError(f"{out} already holds grid.png / samples.npz; pass --overwrite or another --out")


def save_samples(samples: Samples, out: str | Path, settings: SampleSettings, scheduler: str, nrow: int | None = None,
                 scale: int = 4, preview: int = PREVIEW) -> tuple[Path, Path]:  # fmt: skip
    """Write ``grid.png`` (the first ``preview`` samples, upscaled ``scale`` times, ``nrow`` per row) and
    ``samples.npz`` (every sample as uint8 ``(N, H, W, C)`` with its class label and the settings) into ``out``."""
    from fastdiff.images import save_grid, to_uint8

    if preview < 1:
        raise InputError(f"the grid preview needs at least 1 image; got {preview}")
    grid, npz = sample_files(out)
    save_grid(samples.images[:preview], grid, nrow=nrow, scale=scale)
    np.savez(npz, images=to_uint8(samples.images), class_labels=samples.labels.numpy(), seed=np.array(settings.seed),
             steps=np.array(settings.steps), guidance_scale=np.array(settings.guidance_scale), scheduler=np.array(scheduler),
             nfe=np.array(samples.nfe))  # fmt: skip
    return grid, npz
