"""Perceptual distances for training losses (CTM's consistency loss), offline.

* ``l2`` -- the mean squared difference per sample;
* ``features`` -- the mean squared difference of the data set's domain-extractor features (the shipped digits /
  Fashion-MNIST classifiers of :mod:`fastdiff.eval.extractors`): a cheap perceptual metric for CPU recipes;
* ``lpips`` -- LPIPS-VGG (Zhang et al. 2018; the ``lpips`` package) on images resized to 224 x 224 as CTM does
  (``up224``). The package ships its linear heads but downloads the VGG-16 backbone at first use; here the backbone
  comes from a local file (``--lpips-weights`` / the recipe key ``ctm.lpips_weights``: torchvision's
  ``vgg16-397923af.pth`` or a safetensors copy), read with ``weights_only=True``, never unpickled.

Each is an ``nn.Module`` (frozen) so that it moves to the training device with the objective that holds it.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff.errors import InputError

__all__ = ["perceptual_distance", "FeatureDistance", "LPIPSDistance", "VGG16_URL", "PERCEPTUAL_DISTANCES"]

PERCEPTUAL_DISTANCES = ("l2", "features", "lpips")
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


class SquaredDistance(nn.Module):
    """``mean((a - b)^2)`` per sample."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return (a - b).flatten(1).pow(2).mean(1)


class FeatureDistance(nn.Module):
    """Mean squared difference of a frozen feature network's outputs, per sample (images in ``[-1, 1]``, clipped)."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.net = features.eval().requires_grad_(False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        fa, fb = self.net(a.clamp(-1, 1)), self.net(b.clamp(-1, 1))
        return (fa - fb).flatten(1).pow(2).mean(1)


class _Features(nn.Module):
    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x)


class LPIPSDistance(nn.Module):
    """LPIPS-VGG per sample on images in ``[-1, 1]`` (1 channel repeated to 3), bilinearly resized to ``resize``."""

    def __init__(self, backbone_weights: str | Path, resize: int | None = 224):
        super().__init__()
        import warnings

        import lpips

        with warnings.catch_warnings():  # torchvision's deprecation notes on lpips' `pretrained=` calls
            warnings.simplefilter("ignore", UserWarning)
            self.lpips = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval().requires_grad_(False)
        load_vgg16_backbone(self.lpips.net, backbone_weights)
        self.resize = resize

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        if self.resize and a.shape[-1] != self.resize:
            a = F.interpolate(a, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
            b = F.interpolate(b, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return self.lpips(a, b).flatten()


def load_vgg16_backbone(net: nn.Module, path: str | Path) -> None:
    """torchvision's VGG-16 ``features.{i}.*`` tensors from ``path`` into lpips' ``slice1..slice5`` (which keep the
    layer indices as names), read safely; every backbone tensor must be present with its shape."""
    from fastdiff.eval.extractors import _load_state_dict_safely

    path = Path(path)
    if not path.is_file():
        raise InputError(f"LPIPS backbone weights not found: {path}; download {VGG16_URL} and pass its path "
                         "(--lpips-weights / ctm.lpips_weights)")  # fmt: skip
    state = _load_state_dict_safely(path)
    target = net.state_dict()
    mapped = {}
    for key in target:  # slice{j}.{i}.weight <- features.{i}.weight
        _, index, kind = key.split(".")
        source = f"features.{index}.{kind}"
        if source not in state or state[source].shape != target[key].shape:
            got = tuple(state[source].shape) if source in state else "missing"
            raise InputError(f"{path} is not torchvision's VGG-16 state dict: {source} expected {tuple(target[key].shape)}, got {got}")
        mapped[key] = state[source]
    net.load_state_dict(mapped)


def perceptual_distance(kind: str, dataset: str | None = None, lpips_weights: str | Path | None = None) -> nn.Module:
    """The distance ``kind`` (:data:`PERCEPTUAL_DISTANCES`); ``features`` needs a data set with a shipped extractor,
    ``lpips`` the VGG-16 backbone file."""
    if kind not in PERCEPTUAL_DISTANCES:
        raise InputError(f"unknown distance {kind!r}; expected one of {', '.join(PERCEPTUAL_DISTANCES)}")
    if kind == "l2":
        return SquaredDistance()
    if kind == "features":
        from fastdiff.eval.extractors import EXTRACTORS, load_extractor

        if dataset not in EXTRACTORS:
            raise InputError(f"distance 'features' uses the data set's domain extractor, and {dataset!r} has none "
                             f"(shipped: {', '.join(EXTRACTORS)}); use 'l2' or 'lpips'")  # fmt: skip
        return FeatureDistance(_Features(load_extractor(dataset).module))
    if lpips_weights is None:
        raise InputError(f"distance 'lpips' needs the VGG-16 backbone offline: download {VGG16_URL} and pass its path "
                         "(--lpips-weights PATH, or the recipe key ctm.lpips_weights)")  # fmt: skip
    return LPIPSDistance(lpips_weights)

