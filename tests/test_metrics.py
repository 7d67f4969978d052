"""FID / KID / precision-recall: exact formulas, unbiasedness, and the offline Inception path."""

import numpy as np
import pytest
import scipy.linalg
import torch

from fastdiff.errors import InputError
from fastdiff.eval.metrics import FeatureSet, fid, kid, precision_recall


def _scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_equals_numpy_scipy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g, dtype=torch.float64)
    y = torch.randn(400, 16, generator=g, dtype=torch.float64) * 1.3 + 0.2
    expected = _scipy_fid(x.numpy(), y.numpy())
    assert fid(FeatureSet.from_features(x), FeatureSet.from_features(y)) == pytest.approx(expected, rel=1e-6)


def test_fid_of_identical_sets_is_zero_and_stats_round_trip(tmp_path):
    x = FeatureSet.from_features(torch.randn(300, 8))
    assert abs(fid(x, x)) < 1e-8
    x.save(tmp_path / "stats.npz")
    arrays = np.load(tmp_path / "stats.npz")
    stats = FeatureSet.from_stats(arrays["mu"], arrays["sigma"])
    assert abs(fid(x, stats)) < 1e-8


def test_kid_is_unbiased_and_detects_a_shift():
    g = torch.Generator().manual_seed(1)
    a, b = (FeatureSet.from_features(torch.randn(1000, 8, generator=g)) for _ in range(2))
    mean, std = kid(a, b, subsets=200, subset_size=200)
    assert abs(mean) < 4 * std / np.sqrt(200)  # zero in expectation for one distribution
    shifted = FeatureSet.from_features(torch.randn(1000, 8, generator=g) + 0.5)
    mean_shift, std_shift = kid(a, shifted, subsets=200, subset_size=200)
    assert mean_shift > 10 * std_shift / np.sqrt(200)


def test_precision_recall_of_a_collapsed_generator():
    g = torch.Generator().manual_seed(2)
    real = FeatureSet.from_features(torch.randn(500, 4, generator=g))
    same = FeatureSet.from_features(torch.randn(500, 4, generator=g))
    p, r = precision_recall(real, same)
    assert p > 0.8 and r > 0.8
    collapsed = FeatureSet.from_features(torch.randn(500, 4, generator=g) * 0.05)  # all near the mode
    p, r = precision_recall(real, collapsed)
    assert p > 0.95 and r < 0.3


def test_stats_only_and_dimension_errors():
    stats = FeatureSet.from_stats(np.zeros(4), np.eye(4))
    feats = FeatureSet.from_features(torch.randn(10, 4))
    with pytest.raises(InputError, match="KID needs both feature sets"):
        kid(stats, feats)
    with pytest.raises(InputError, match="feature dimensions differ: 3 vs 4"):
        fid(FeatureSet.from_features(torch.randn(10, 3)), feats)
    with pytest.raises(InputError, match=r"mu must be \(D,\) and sigma \(D, D\)"):
        FeatureSet.from_stats(np.zeros(4), np.eye(3))


def test_inception_path_offline_with_a_generated_weights_file(tmp_path, monkeypatch):
    """The standard extractor end to end; the weights file is made here, never downloaded or committed."""
    from fastdiff.eval.extractors import load_extractor
    from fastdiff.testing import write_random_inception_weights

    weights = write_random_inception_weights(tmp_path / "inception.pth")
    ext = load_extractor("inception", weights)
    assert "antialias=False" in ext.resize
    feats = ext(torch.rand(3, 1, 16, 16) * 2 - 1)  # grayscale is repeated to RGB, resized to 299 inside
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(InputError, match="Inception weights not found .* --inception-weights PATH"):
        load_extractor("inception", None)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot load weights from .*bad.pth safely"):
        load_extractor("inception", tmp_path / "bad.pth")

