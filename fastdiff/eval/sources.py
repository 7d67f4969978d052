"""What ``fastdiff fid`` evaluates: image sources -> features -> FID / KID / precision-recall, with cached reference
statistics and a record of everything that determines the numbers.

Sources (strings, as on the command line):

* a folder of images (PNG/JPEG/...; all one size unless ``size`` is given: shorter side resized, centre crop);
* an ``.npz`` holding an image array under ``images`` or ``arr_0`` (uint8 ``NHWC`` / ``NHW``, as OpenAI's evaluator and
  ``fastdiff sample`` write), or statistics ``mu`` and ``sigma`` (pytorch-fid / clean-fid layout);
* a data set split: ``digits:test``, ``fashion-mnist:train``, ...
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastdiff.errors import InputError
from fastdiff.eval.extractors import Extractor
from fastdiff.images import from_pixels, to_pixels
from fastdiff.eval.metrics import FeatureSet, extract_features, fid, kid, precision_recall

__all__ = ["load_source", "source_features", "compare", "cache_dir", "ImageSource"]

_DATASET_SPEC = re.compile(r"^(digits|fashion-mnist)(?::(train|test))?$")


@dataclass
class ImageSource:
    images: Tensor | None  # (N, C, H, W) float in [-1, 1]; None for a statistics file
    stats: FeatureSet | None  # set for a statistics file
    description: str
    content_sha256: str


def cache_dir() -> Path:
    """Where reference features are cached (``$FASTDIFF_CACHE`` or ``~/.cache/fastdiff``)."""
    return Path(os.environ.get("FASTDIFF_CACHE", Path.home() / ".cache" / "fastdiff")) / "fid"


def _hash_images(images: Tensor) -> str:
    pixels = to_pixels(images).contiguous()
    h = hashlib.sha256(str(tuple(pixels.shape)).encode())
    h.update(pixels.numpy().tobytes())
    return h.hexdigest()


def _images_from_array(array: np.ndarray, where: str) -> Tensor:
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise InputError(f"{where}: expected an image array (N, H, W, C) with C = 1 or 3; got shape {array.shape}")
    if array.dtype != np.uint8:
        raise InputError(f"{where}: expected uint8 pixels (0..255); got {array.dtype}")
    return from_pixels(torch.from_numpy(array)).permute(0, 3, 1, 2).contiguous()


def load_source(spec: str, channels: int, size: int | None = None) -> ImageSource:
    """Images (or statistics) from a folder, an ``.npz`` or a data set split; at least 2 images."""
    path = Path(spec)
    if path.is_dir():
        from fastdiff.datasets import load_image_folder

        images = load_image_folder(path, size=size, channels=channels).data
        return _checked(ImageSource(images, None, f"folder {path}", _hash_images(images)))
    if path.suffix == ".npz":
        if not path.is_file():
            raise InputError(f"file not found: {path}")
        try:
            arrays = np.load(path, allow_pickle=False)
            keys = set(arrays.files)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read {path}: {err}") from None
        if {"mu", "sigma"} <= keys:
            stats = FeatureSet.from_stats(arrays["mu"], arrays["sigma"], int(arrays["n"]) if "n" in keys else 0, str(path))
            if "features" in keys:
                stats = FeatureSet.from_features(torch.from_numpy(arrays["features"]))
            return ImageSource(None, stats, f"statistics {path}", hashlib.sha256(path.read_bytes()).hexdigest())
        for key in ("images", "arr_0"):
            if key in keys:
                images = _images_from_array(arrays[key], str(path))
                return _checked(ImageSource(images, None, f"array {path}:{key}", _hash_images(images)))
        raise InputError(f"{path} holds neither statistics (mu, sigma) nor images (images, arr_0); keys: {sorted(keys)}")
    match = _DATASET_SPEC.match(spec)
    if match and not path.exists():
        from fastdiff.datasets import load_dataset

        images = load_dataset(match.group(1), match.group(2) or "test").data
        return ImageSource(images, None, f"data set {match.group(1)}:{match.group(2) or 'test'}", _hash_images(images))
    raise InputError(f"{spec}: not a folder, an .npz file or a data set split (digits:test, fashion-mnist:train, ...)")


def _checked(source: ImageSource) -> ImageSource:
    if source.images is not None and len(source.images) < 2:
        raise InputError(f"{source.description}: FID needs at least 2 images; found {len(source.images)}")
    return source


def source_features(
    source: ImageSource, extractor: Extractor, use_cache: bool = True, progress: bool = False
) -> FeatureSet:
    """Features of a source, cached on disk by (extractor weights, image content) hash."""
    if source.stats is not None:
        return source.stats
    channels = source.images.shape[1]
    wanted = extractor.image_shape[0] if extractor.image_shape else None
    if wanted is not None and channels != wanted:
        raise InputError(f"{source.description}: images have {channels} channels, the {extractor.name} extractor takes {wanted}")
    # "u8": features of the quantised pixels (entries written before every FID scored uint8 pixels are not reused)
    key = f"{extractor.name}-{extractor.weights_sha256[:12]}-u8-{source.content_sha256[:24]}.npz"
    path = cache_dir() / key
    if use_cache and path.is_file():
        return FeatureSet.from_features(torch.from_numpy(np.load(path)["features"]))
    features = FeatureSet.from_features(extract_features(extractor, source.images, progress=progress, desc=source.description))
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
        features.save(tmp)
        tmp.replace(path)  # atomic: concurrent runs never read half a file
    return features


def compare(generated: FeatureSet, reference: FeatureSet, with_kid: bool = False, with_pr: bool = False, seed: int = 0) -> dict:
    """FID always; KID (mean, std) and precision/recall on request."""
    result = {"fid": fid(generated, reference)}
    if with_kid:
        result["kid_mean"], result["kid_std"] = kid(reference, generated, seed=seed)
    if with_pr:
        result["precision"], result["recall"] = precision_recall(reference, generated)
    return result
