"""Data loaders: shapes, ranges, determinism and clear errors."""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.datasets import FASHION_MNIST_DIR, load_digits, load_fashion_mnist, load_image_folder, read_idx, toy_2d
from fastdiff.errors import InputError
from fastdiff.oracle import eight_gaussians


def test_digits_split_shapes_and_range():
    train, test = load_digits("train"), load_digits("test")
    assert train.data.shape == (1437, 1, 8, 8) and test.data.shape == (360, 1, 8, 8)
    assert train.data.dtype == torch.float32 and train.data.min() == -1 and train.data.max() == 1
    assert train.num_classes == 10 and set(test.labels.tolist()) == set(range(10))
    # stratified: every class is ~20% test
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_seeded_order_is_deterministic():
    a, b, c = load_digits(seed=1), load_digits(seed=1), load_digits(seed=2)
    assert torch.equal(a.data, b.data) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.data, c.data)
    base = load_digits()
    assert torch.equal(a.data.sum(0), base.data.sum(0))  # the same images, reordered


def _write_idx(path, array, dtype_code=0x08):
    header = bytes([0, 0, dtype_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(">u1").tobytes())


def test_fashion_mnist_from_a_user_folder(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 3]))
    ds = load_fashion_mnist("test", root=tmp_path)
    assert ds.data.shape == (3, 1, 28, 28) and ds.labels.tolist() == [9, 0, 3]
    torch.testing.assert_close(ds.data[0, 0], torch.from_numpy(images[0] / 127.5 - 1).float())
    assert ds.class_names[9] == "Ankle boot"


def test_fashion_mnist_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match=r"not found: .*train-images-idx3-ubyte.gz.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3))
    raw = gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(InputError, match="t10k-images-idx3-ubyte.gz is truncated or corrupt"):
        load_fashion_mnist("test", root=tmp_path)
    (tmp_path / "junk.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="cannot read .*junk.gz"):
        read_idx(tmp_path / "junk.gz")


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_package():
    ds = load_fashion_mnist("test")
    assert ds.data.shape == (10_000, 1, 28, 28) and ds.data.min() == -1 and ds.data.max() == 1
    assert torch.bincount(ds.labels).tolist() == [1000] * 10


def _png(path, size, value, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_image_folder_with_labels_and_resize(tmp_path):
    _png(tmp_path / "cat" / "a.png", (12, 10), (255, 0, 0))
    _png(tmp_path / "dog" / "b.jpg", (10, 10), (0, 0, 255))
    _png(tmp_path / "dog" / "c.png", (20, 30), (255, 255, 255))
    ds = load_image_folder(tmp_path, size=8, labels=True)
    assert ds.data.shape == (3, 3, 8, 8) and ds.labels.tolist() == [0, 1, 1] and ds.class_names == ("cat", "dog")
    torch.testing.assert_close(ds.data[0, :, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    gray = load_image_folder(tmp_path, size=8, channels=1)
    assert gray.data.shape == (3, 1, 8, 8) and gray.num_classes == 0


def test_image_folder_errors(tmp_path):
    with pytest.raises(InputError, match="image folder not found"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(InputError, match="no images"):
        load_image_folder(tmp_path)
    _png(tmp_path / "a.png", (8, 8), (0, 0, 0))
    _png(tmp_path / "b.png", (9, 8), (0, 0, 0))
    with pytest.raises(InputError, match=r"images differ in size: .*a.png is \(8, 8\), .*b.png is \(8, 9\); pass size="):
        load_image_folder(tmp_path)
    with pytest.raises(InputError, match="class subfolder"):
        load_image_folder(tmp_path, labels=True)
    (tmp_path / "c.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(InputError, match="cannot read image .*c.png"):
        load_image_folder(tmp_path, size=8)


@pytest.mark.parametrize("name", ["8gaussians", "moons", "circles", "checkerboard", "swissroll"])
def test_toy_2d(name):
    ds = toy_2d(name, n=2000, seed=0)
    assert ds.data.shape == (2000, 2) and ds.data.abs().max() <= 1.3
    assert torch.equal(ds.data, toy_2d(name, n=2000, seed=0).data)


def test_eight_gaussians_data_is_the_oracle():
    ds, gmm = toy_2d("8gaussians", n=8000), eight_gaussians()
    for k in range(8):
        torch.testing.assert_close(ds.data[ds.labels == k].double().mean(0), gmm.means[k], atol=0.01, rtol=0)
