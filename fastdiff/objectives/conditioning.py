"""Conditioning shared by the objectives: label and prompt conditioners with a null condition, per-sample label
dropout (the null condition seen by every pass of a dropped sample), and shared dropout masks for the two branches
of a consistency loss."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from fastdiff.errors import InputError
from fastdiff.objectives.base import per_sample_rand

__all__ = ["ClassConditioner", "TextConditioner", "same_dropout", "dropout_mask", "condition_kwargs", "check_unconditional", "view"]


@contextlib.contextmanager
def same_dropout(seed: int, device: torch.device):
    """Run a block with the global RNG (CPU and, when used, the accelerator) seeded by ``seed``, restoring it after:
    both branches of a consistency loss then draw the same dropout masks."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def dropout_mask(seeds: Tensor, p_uncond: float) -> Tensor:
    """Which samples lose their condition (label dropout with probability ``p_uncond``; stream 2 of each seed)."""
    return per_sample_rand(seeds, 2, seeds.device) < p_uncond


def condition_kwargs(conditioner: Any, batch: dict[str, Tensor], null: Tensor) -> dict[str, Tensor]:
    """The model's keyword arguments for ``batch`` (none for an unconditional objective); ``null`` marks the samples
    that get the null condition."""
    if conditioner is None:
        return {}
    if "labels" not in batch:
        raise InputError("this objective is conditional, so the batch needs 'labels'; build it without classes "
                         "(num_classes=None / conditioner=None) for unconditional training")  # fmt: skip
    return conditioner(batch["labels"], null)


def check_unconditional(conditional: bool, p_uncond: float) -> None:
    if not conditional and p_uncond > 0:
        raise InputError(f"p_uncond={p_uncond} drops labels, but this objective is unconditional; set p_uncond=0")


def view(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class ClassConditioner:
    """Class labels as the model's ``class_labels``; label ``num_classes`` is the null (unconditional) one."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, labels: Tensor, null: Tensor) -> dict[str, Tensor]:
        return {"class_labels": torch.where(null, torch.full_like(labels, self.num_classes), labels)}

    def probe_labels(self, n: int, device: torch.device) -> Tensor:
        """``n`` valid labels (for a shape probe)."""
        return torch.zeros(n, dtype=torch.long, device=device)


class TextConditioner(nn.Module):
    """Text conditioning for UNet2DConditionModel students: ``labels`` index a table of prompt embeddings (one per
    caption, computed once); the null prompt's embedding stands in where a label is dropped."""

    def __init__(self, prompt_embeds: Tensor, null_embed: Tensor):
        super().__init__()
        self.register_buffer("table", prompt_embeds, persistent=False)
        self.register_buffer("null_embed", null_embed.reshape(1, *prompt_embeds.shape[1:]), persistent=False)

    def __call__(self, labels: Tensor, null: Tensor) -> dict[str, Tensor]:
        embeds = self.table[labels]
        return {"encoder_hidden_states": torch.where(view(null, embeds).bool(), self.null_embed.to(embeds.dtype), embeds)}

    def probe_labels(self, n: int, device: torch.device) -> Tensor:
        """``n`` valid labels (for a shape probe)."""
        return torch.zeros(n, dtype=torch.long, device=device)
