"""Helpers for tests and offline benchmarks: files that would otherwise come from the internet, made locally."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch

__all__ = ["write_random_inception_weights", "CountingDenoiser"]


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised Inception-v3 state dict in torch-fidelity's layout to ``path``.

    It exercises the standard FID code path end to end on an offline machine; its FIDs are not comparable to
    published numbers (those need torch-fidelity's real ``pt_inception-2015-12-05-6726825d.pth``).
    """
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(seed)
    with mock.patch.object(fe, "load_state_dict_from_url", return_value={}), mock.patch.object(
        fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None
    ):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


class CountingDenoiser:
    """Wraps a denoiser and counts its evaluations (NFE)."""

    def __init__(self, den):
        self.den, self.calls = den, 0

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        return self.den(x, sigma, **cond)
