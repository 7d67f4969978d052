"""Batch sources: what the trainer draws its global batches from.

A batch is a dict with ``x`` (the samples), ``labels`` (class ids, or indices into a prompt table) and ``seeds``
(one int64 per sample; the objective draws every random number of that sample from it). A source gives the global
batch of any step, ``batch(step)``, independently of how many processes share it and of where a run was resumed.

* :class:`TensorSource` -- tensors in memory: epochs are permutations fixed by ``(seed, epoch)``; bit-exact resume.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from fastdiff.errors import InputError

__all__ = ["BatchSource", "TensorSource", "global_batch", "sample_seeds"]


@runtime_checkable
class BatchSource(Protocol):
    """What :func:`fastdiff.training.trainer.train` needs from its data."""

    def batch(self, step: int) -> dict[str, Tensor]:
        """The global batch of step ``step`` (``x``, ``labels``, ``seeds``)."""
        ...


def sample_seeds(step: int, batch_size: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """The per-sample seeds of global step ``step``: fixed by ``(seed, step, position)``."""
    return (seed * 1_000_003 + step) * batch_size + torch.arange(batch_size, device=device)


def global_batch(images: Tensor, labels: Tensor, step: int, batch_size: int, seed: int) -> dict[str, Tensor]:
    """The images of global step ``step``: epochs are permutations fixed by ``(seed, epoch)``; every sample also gets
    a seed for the objective's random numbers, fixed by ``(seed, step, position)``."""
    n = len(images)
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise InputError(f"trainer.batch_size={batch_size} is larger than the dataset ({n} images)")
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    idx = perm[pos * batch_size : (pos + 1) * batch_size].to(images.device)
    return {"x": images[idx], "labels": labels[idx], "seeds": sample_seeds(step, batch_size, seed, images.device)}


class TensorSource:
    """Samples and labels held as tensors (moved to the training device once): today's in-memory behaviour."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, seed: int = 0):
        if len(images) != len(labels):
            raise InputError(f"{len(images)} samples but {len(labels)} labels")
        self.images, self.labels, self.batch_size, self.seed = images, labels, batch_size, seed

    def to(self, device: torch.device | str) -> TensorSource:
        return TensorSource(self.images.to(device), self.labels.to(device), self.batch_size, self.seed)

    def batch(self, step: int) -> dict[str, Tensor]:
        return global_batch(self.images, self.labels, step, self.batch_size, self.seed)
