"""FID, KID and precision/recall on feature sets, with torchmetrics underneath.

Images become features once (:class:`~fastdiff.eval.extractors.Extractor`); a :class:`FeatureSet` keeps the features (for
KID and precision/recall) and their moments (for FID). FID is torchmetrics' formula on the two sets' means and
unbiased covariances, KID is torchmetrics' unbiased polynomial-kernel MMD over random subsets (mean and std), and
precision/recall is the k-nearest-neighbour manifold estimate of Kynkäänniemi et al. (2019), which torchmetrics lacks.
A set may also be only moments (``mu``, ``sigma`` from a statistics ``.npz`` in pytorch-fid / clean-fid layout); then
FID is all it supports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fastdiff.errors import InputError

__all__ = ["FeatureSet", "fid", "kid", "precision_recall", "extract_features", "fid_of_samples"]


@dataclass
class FeatureSet:
    """Features ``(N, D)`` (optional) and their mean ``(D,)`` and unbiased covariance ``(D, D)``, in float64."""

    mu: Tensor
    sigma: Tensor
    n: int
    features: Tensor | None = None

    @classmethod
    def from_features(cls, features: Tensor) -> FeatureSet:
        features = features.detach().double().cpu()
        if features.ndim != 2 or features.shape[0] < 2:
            raise InputError(f"need at least 2 feature vectors (N, D); got shape {tuple(features.shape)}")
        return cls(features.mean(0), torch.cov(features.T).reshape(features.shape[1], -1), features.shape[0], features)

    @classmethod
    def from_stats(cls, mu: np.ndarray, sigma: np.ndarray, n: int = 0, source: str = "statistics") -> FeatureSet:
        mu, sigma = torch.as_tensor(np.asarray(mu), dtype=torch.float64), torch.as_tensor(np.asarray(sigma), dtype=torch.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise InputError(f"{source}: mu must be (D,) and sigma (D, D); got {tuple(mu.shape)} and {tuple(sigma.shape)}")
        return cls(mu, sigma, int(n))

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    def save(self, path) -> None:
        """Write ``mu``, ``sigma`` (pytorch-fid / clean-fid layout), ``n`` and, when present, ``features``."""
        arrays = {"mu": self.mu.numpy(), "sigma": self.sigma.numpy(), "n": np.array(self.n)}
        if self.features is not None:
            arrays["features"] = self.features.float().numpy()
        np.savez(path, **arrays)


def _check_dims(a: FeatureSet, b: FeatureSet) -> None:
    if a.dim != b.dim:
        raise InputError(f"feature dimensions differ: {a.dim} vs {b.dim} (were both sets made with the same extractor?)")


def fid(a: FeatureSet, b: FeatureSet) -> float:
    """Fréchet distance ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (Heusel et al. 2017, eq. 6)."""
    from fastdiff._compat import compute_fid  # torchmetrics' own formula, shared by its FID metric

    _check_dims(a, b)
    return compute_fid(a.mu, a.sigma, b.mu, b.sigma)


class _Identity(nn.Module):
    """Lets torchmetrics' image metrics take precomputed features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def kid(a: FeatureSet, b: FeatureSet, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel inception distance (Bińkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel, mean and std
    over ``subsets`` random subsets (of at most ``subset_size``), by torchmetrics."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    _check_dims(a, b)
    if a.features is None or b.features is None:
        raise InputError("KID needs both feature sets, not only statistics (mu, sigma); drop --kid for a stats file")
    size = min(subset_size, a.n, b.n)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Identity(a.dim), subsets=subsets, subset_size=size)
    metric.update(a.features, real=True)
    metric.update(b.features, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _knn_radii(x: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distance of each row of ``x`` to its k-th nearest other row."""
    return torch.cat([torch.cdist(x[i : i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)])


def _inside(query: Tensor, ref: Tensor, radii: Tensor, chunk: int = 1024) -> Tensor:
    """For each query row: does it lie in some ball ``B(ref_j, radii_j)``?"""
    return torch.cat([(torch.cdist(query[i : i + chunk], ref) <= radii[None]).any(1) for i in range(0, len(query), chunk)])


def precision_recall(real: FeatureSet, fake: FeatureSet, k: int = 3) -> tuple[float, float]:
    """Improved precision (share of fake samples inside the real manifold) and recall (share of real samples inside
    the fake manifold), manifolds as unions of k-NN balls (Kynkäänniemi et al. 2019, eq. 1-3; k = 3)."""
    _check_dims(real, fake)
    if real.features is None or fake.features is None:
        raise InputError("precision/recall needs both feature sets, not only statistics (mu, sigma)")
    if min(real.n, fake.n) <= k:
        raise InputError(f"precision/recall with k={k} needs more than {k} samples per set")
    r, f = real.features.float(), fake.features.float()
    precision = _inside(f, r, _knn_radii(r, k)).float().mean().item()
    recall = _inside(r, f, _knn_radii(f, k)).float().mean().item()
    return precision, recall


def extract_features(extractor, images: Tensor, batch_size: int = 256, progress: bool = False, desc: str = "features") -> Tensor:
    """``extractor`` over ``images`` ``(N, C, H, W)`` in batches, with an optional progress bar."""
    from tqdm.auto import tqdm

    chunks = range(0, len(images), batch_size)
    return torch.cat([extractor(images[i : i + batch_size]) for i in tqdm(chunks, desc=desc, disable=not progress, leave=False)])


def fid_of_samples(images, extractor, reference) -> float:
    """FID of raw samples against ``reference`` features, scored as their saved uint8 pixels (the extractor quantises)."""
    return fid(FeatureSet.from_features(extract_features(extractor, images)), reference)
