"""Feature extractors for FID / KID: small domain classifiers fastdiff trains and ships, and Inception-v3.

The domain extractors (``fastdiff/assets/extractors/digits``, ``.../fashion-mnist``) are CNN classifiers trained on
the data sets' training splits (``scripts/train_extractors.py``); the feature is the 128-d penultimate layer. They give
honest, cheap FIDs on these domains, where ImageNet's Inception features say little about 8x8 or 28x28 grayscale
images. ``inception`` is the standard 2048-d pool feature with torch-fidelity's weights, as every paper reports.

Every extractor maps float images in ``[-1, 1]`` of shape ``(N, C, H, W)`` to features ``(N, D)``, after quantising them
to the uint8 pixels a saved image holds (:func:`fastdiff.images.to_pixels`): every FID scores what would be saved.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fastdiff.errors import InputError
from fastdiff.eval.assets import ASSETS
from fastdiff.images import from_pixels, to_pixels

__all__ = ["DomainClassifier", "Extractor", "load_extractor", "EXTRACTORS", "ASSETS", "INCEPTION_WEIGHTS_NAME"]

EXTRACTORS = ("inception", "digits", "fashion-mnist")
INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's file name


@dataclass
class ClassifierConfig:
    channels: int = 1
    size: int = 28
    num_classes: int = 10
    width: int = 32  # channels of the first conv; doubled twice
    feature_dim: int = 128
    pool: int = 2  # spatial grid kept before the features (global average pooling loses too much shape)


class DomainClassifier(nn.Module):
    """conv(w) - pool - conv(2w) - pool - conv(4w) - average to pool x pool - fc(feature_dim) [features] - fc(classes)."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        self.body = nn.Sequential(
            nn.Conv2d(cfg.channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(cfg.pool), nn.Flatten(),
            nn.Linear(4 * w * cfg.pool**2, cfg.feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(cfg.feature_dim, cfg.num_classes))

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def save(self, folder: str | Path, **record: object) -> Path:
        """safetensors weights + ``config.json`` (architecture and ``record``, e.g. test accuracy)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"architecture": asdict(self.cfg), **record}, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> DomainClassifier:
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in ("config.json", "model.safetensors"):
            if not (folder / name).is_file():
                raise InputError(f"feature extractor folder {folder} has no {name}")
        cfg = ClassifierConfig(**json.loads((folder / "config.json").read_text())["architecture"])
        model = cls(cfg)
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model.eval()


@dataclass
class Extractor:
    """A feature map with what a report must say about it."""

    name: str
    module: nn.Module
    image_shape: tuple[int, int, int] | None  # required (C, H, W); None: any size (resized inside)
    weights_sha256: str
    resize: str  # how images are brought to the network's size

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        if images.ndim != 4:
            raise InputError(f"{self.name} extractor expects images (N, C, H, W); got {tuple(images.shape)}")
        if self.image_shape is not None and tuple(images.shape[1:]) != self.image_shape:
            raise InputError(
                f"{self.name} extractor expects images of shape (N, {', '.join(map(str, self.image_shape))}); "
                f"got {tuple(images.shape)}"
            )
        pixels = to_pixels(images)  # score what would be saved: uint8, as the real images are
        if self.name == "inception":
            if images.shape[1] not in (1, 3):
                raise InputError(f"inception expects 1 or 3 channels; got {images.shape[1]}")
            return self.module(pixels.expand(-1, 3, -1, -1)).float()
        return self.module.features(from_pixels(pixels))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_extractor(name: str, inception_weights: str | Path | None = None, device: str = "cpu") -> Extractor:
    """``inception``, ``digits``, ``fashion-mnist`` or a folder saved by :meth:`DomainClassifier.save`."""
    if name == "inception":
        return _inception(inception_weights, device)
    folder = ASSETS / "extractors" / name if name in EXTRACTORS else Path(name)
    if not folder.is_dir():
        raise InputError(f"unknown extractor {name!r}; expected one of {', '.join(EXTRACTORS)} or a saved folder")
    model = DomainClassifier.load(folder).to(device)
    cfg = model.cfg
    return Extractor(name, model, (cfg.channels, cfg.size, cfg.size), _sha256(folder / "model.safetensors"), "none (exact size)")


def _inception(weights: str | Path | None, device: str) -> Extractor:
    """torchmetrics' Inception-v3 with torch-fidelity's weights, resized as torch-fidelity does (``antialias=False``:
    TF1-style bilinear to 299x299), so numbers match torch-fidelity and the literature."""
    if weights is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME
        if not cached.is_file():
            raise InputError(
                f"Inception weights not found (looked for {cached}); this machine is offline, so pass "
                f"--inception-weights PATH to torch-fidelity's {INCEPTION_WEIGHTS_NAME}"
            )
        weights = cached
    weights = Path(weights)
    if not weights.is_file():
        raise InputError(f"--inception-weights file not found: {weights}")
    import tempfile

    from torchmetrics.image.fid import NoTrainInceptionV3

    # torch-fidelity unpickles the file it is given (weights_only=False); give it only a copy of tensors we loaded
    # safely ourselves.
    state = _load_state_dict_safely(weights)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / "inception.pth")
        try:
            module = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(Path(tmp) / "inception.pth"), antialias=False)
        except RuntimeError as err:  # wrong keys or shapes
            raise InputError(f"{weights} is not torch-fidelity's Inception-v3 state dict: {str(err)[:300]}") from None
    return Extractor("inception", module.to(device), None, _sha256(weights), "tf1-bilinear to 299x299 (antialias=False)")


def _load_state_dict_safely(path: Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file, never unpickling anything but tensors."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable or unsafe file is bad input
        raise InputError(f"cannot load weights from {path} safely: {str(err)[:300]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"{path} does not hold a state dict of tensors")
    return state
