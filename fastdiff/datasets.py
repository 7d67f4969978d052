"""Datasets: toy 2-D sets, sklearn's 8x8 digits, Fashion-MNIST (IDX files) and users' image folders.

Every loader returns a :class:`LabeledData`: images in ``[-1, 1]`` as float32 ``(N, C, H, W)`` (points ``(N, 2)`` for
toy sets) with int64 labels ``(N,)``. The order is the source's order, or a fixed permutation of it when ``seed`` is
given, so a run is reproducible. Missing or unreadable files raise :class:`~fastdiff.errors.InputError` naming the path
and the fix.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fastdiff.errors import InputError, check_choice

__all__ = [
    "LabeledData",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "TOY_2D",
    "load_digits",
    "load_fashion_mnist",
    "load_image_folder",
    "toy_2d",
    "read_idx",
    "resize_center_crop",
    "image_pixels",
    "make_loader",
    "load_dataset",
    "DATASETS",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SPLITS = ("train", "test")
TOY_2D = ("8gaussians", "moons", "circles", "checkerboard", "swissroll")
DATASETS = ("digits", "fashion-mnist", "folder", *TOY_2D)


@dataclass
class LabeledData(Dataset):
    """Tensors with labels; ``data[i]`` is ``(x, label)``.

    Attributes:
        data: ``(N, C, H, W)`` images in ``[-1, 1]`` (or ``(N, 2)`` points), float32.
        labels: ``(N,)`` int64 class indices (all 0 when unlabelled).
        num_classes: number of classes (0 when unlabelled).
        class_names: a name per class.
        name: where the data came from.
    """

    data: Tensor
    labels: Tensor
    num_classes: int
    class_names: tuple[str, ...] = ()
    name: str = ""

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.data[i], self.labels[i]

    def shuffled(self, seed: int | None) -> LabeledData:
        """The same data in the order of a permutation fixed by ``seed`` (``None``: unchanged)."""
        if seed is None:
            return self
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return LabeledData(self.data[perm], self.labels[perm], self.num_classes, self.class_names, self.name)


def make_loader(data: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True) -> DataLoader:
    """A DataLoader whose shuffling is fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator)


def _to_unit_range(pixels: np.ndarray, max_value: float) -> Tensor:
    return torch.from_numpy(pixels.astype(np.float32) / (max_value / 2) - 1)


# -- sklearn digits ------------------------------------------------------------------------------------------------


def load_digits(split: str = "train", seed: int | None = None) -> LabeledData:
    """sklearn's 8x8 handwritten digits ``(N, 1, 8, 8)``, 10 classes; a fixed stratified 80/20 train/test split
    (1437 / 360 images)."""
    check_choice("split", split, SPLITS)
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    idx_train, idx_test = train_test_split(
        np.arange(len(digits.target)), test_size=0.2, random_state=0, stratify=digits.target
    )
    idx = np.sort(idx_train if split == "train" else idx_test)
    images = _to_unit_range(digits.images[idx][:, None], 16.0)
    labels = torch.from_numpy(digits.target[idx].astype(np.int64))
    return LabeledData(images, labels, 10, tuple(map(str, range(10))), f"digits/{split}").shuffled(seed)


# -- Fashion-MNIST (IDX) -------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    try:
        raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    except (OSError, EOFError) as err:
        raise InputError(f"cannot read {path}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise InputError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()!r})")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset, expected = 4 + 4 * ndim, math.prod(shape) * dtype.itemsize
    if len(raw) - offset != expected:
        raise InputError(f"{path} is truncated or corrupt: header says {shape} ({expected} bytes), file has {len(raw) - offset}")
    return np.frombuffer(raw, dtype, offset=offset).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None, seed: int | None = None) -> LabeledData:
    """Fashion-MNIST 28x28 ``(N, 1, 28, 28)``, 10 classes, from the IDX files in ``root``
    (default: Debian's ``dataset-fashion-mnist`` package, ``/usr/share/datasets/fashion-mnist``)."""
    check_choice("split", split, SPLITS)
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    paths = [_find_idx(root, f"{prefix}-{kind}-idx{n}-ubyte") for kind, n in (("images", 3), ("labels", 1))]
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise InputError(f"{paths[0]} and {paths[1]} do not match: images {images.shape}, labels {labels.shape}")
    return LabeledData(
        _to_unit_range(images[:, None], 255.0),
        torch.from_numpy(labels.astype(np.int64)),
        10,
        FASHION_MNIST_CLASSES,
        f"fashion-mnist/{split}",
    ).shuffled(seed)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise InputError(
        f"Fashion-MNIST file not found: {root / (stem + '.gz')}. Install it with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or pass the folder that holds the IDX files as root"
    )


# -- image folders -------------------------------------------------------------------------------------------------


def load_image_folder(
    root: str | Path, size: int | None = None, channels: int = 3, labels: bool = False, seed: int | None = None
) -> LabeledData:
    """Images (PNG, JPEG, BMP, WebP) under ``root``, as ``(N, channels, H, W)`` in ``[-1, 1]``.

    Args:
        root: the folder; with ``labels=True`` each immediate subfolder is a class (sorted names -> 0, 1, ...).
        size: resize rule: the shorter side is resized to ``size`` (bicubic) and the centre ``size x size`` crop kept.
            ``None`` keeps the files' size, which must then be the same for all.
        channels: 1 (grayscale) or 3 (RGB); files are converted.
        labels: take labels from subfolders; otherwise all labels are 0 and ``num_classes`` is 0.
        seed: fixed shuffling of the order (``None``: sorted by path).
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 or 3; got {channels}")
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    class_names = tuple(sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1}))
    if labels:
        stray = [p for p in files if len(p.relative_to(root).parts) == 1]
        if stray or not class_names:
            raise InputError(f"labels=True needs every image inside a class subfolder of {root}; {stray[0] if stray else root} is not")
    arrays, first = [], None
    for path in files:
        try:
            with Image.open(path) as img:
                array = image_pixels(img, size, channels)
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"cannot read image {path}: {err}") from None
        first = first or (path, array.shape)
        if array.shape != first[1]:
            raise InputError(
                f"images differ in size: {first[0]} is {first[1][1:]}, {path} is {array.shape[1:]}; pass size=N to resize"
            )
        arrays.append(array)
    pixels = np.stack(arrays)
    index = {c: i for i, c in enumerate(class_names)}
    y = [index[p.relative_to(root).parts[0]] if labels else 0 for p in files]
    return LabeledData(
        _to_unit_range(np.ascontiguousarray(pixels), 255.0),
        torch.tensor(y, dtype=torch.long),
        len(class_names) if labels else 0,
        class_names if labels else (),
        str(root),
    ).shuffled(seed)


def image_pixels(img, size: int | None = None, channels: int = 3) -> np.ndarray:
    """A PIL image as uint8 pixels ``(channels, H, W)``: converted to grayscale or RGB, and with ``size`` the shorter
    side resized to it (bicubic) and the centre square kept."""
    img = img.convert("L" if channels == 1 else "RGB")
    img = resize_center_crop(img, size) if size else img
    array = np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on PIL's read-only buffer)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def resize_center_crop(img, size: int):
    """A PIL image resized (bicubic) so its shorter side is ``size``, then its centre ``size x size`` crop."""
    from PIL import Image

    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


# -- toy 2-D sets --------------------------------------------------------------------------------------------------


def toy_2d(name: str, n: int = 10_000, seed: int = 0) -> LabeledData:
    """A 2-D toy set ``(n, 2)`` scaled into ``[-1, 1]``: ``8gaussians`` (exactly :func:`fastdiff.oracle.eight_gaussians`,
    label = component), ``moons``, ``circles`` (label = which one), ``checkerboard`` (label = square), ``swissroll``."""
    check_choice("toy data set", name, TOY_2D)
    if n < 1:
        raise InputError(f"n must be >= 1; got {n}")
    g = torch.Generator().manual_seed(seed)
    if name == "8gaussians":
        from fastdiff.oracle import eight_gaussians

        gmm = eight_gaussians()
        x, y = _mixture_with_labels(gmm, n, g)
    elif name == "checkerboard":
        x, y = _checkerboard(n, g)
    else:
        x, y = _sklearn_toy(name, n, seed)
    return LabeledData(x.float(), y, int(y.max()) + 1, tuple(map(str, range(int(y.max()) + 1))), name)


def _mixture_with_labels(gmm, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    comp = torch.multinomial(gmm.weights, n, replacement=True, generator=g)
    noise = torch.randn(n, gmm.dim, generator=g, dtype=torch.float64)
    return gmm.means[comp] + gmm.variances[comp].sqrt() * noise, gmm.labels[comp]


def _checkerboard(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Uniform on the 8 dark squares of a 4x4 board over [-1, 1]^2."""
    square = torch.randint(0, 8, (n,), generator=g)
    row = square // 2
    col = 2 * (square % 2) + row % 2
    offset = torch.rand(n, 2, generator=g)
    x = torch.stack([col, row], 1) + offset
    return x / 2 - 1, square


def _sklearn_toy(name: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
    from sklearn import datasets

    if name == "moons":
        x, y = datasets.make_moons(n, noise=0.05, random_state=seed)
        x = (x - [0.5, 0.25]) / 1.5
    elif name == "circles":
        x, y = datasets.make_circles(n, noise=0.03, factor=0.5, random_state=seed)
        x = x * 0.9
    else:
        x, _ = datasets.make_swiss_roll(n, noise=0.3, random_state=seed)
        x, y = x[:, [0, 2]] / 13.0, np.zeros(n, dtype=np.int64)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def load_dataset(
    name: str,
    split: str = "train",
    root: str | Path | None = None,
    size: int | None = None,
    channels: int = 3,
    labels: bool = True,
    seed: int | None = None,
) -> LabeledData:
    """Any of :data:`DATASETS` by name (``folder`` reads ``root`` with :func:`load_image_folder`)."""
    check_choice("dataset", name, DATASETS)
    if name == "digits":
        return load_digits(split, seed=seed)
    if name == "fashion-mnist":
        return load_fashion_mnist(split, root=root, seed=seed)
    if name == "folder":
        if root is None:
            raise InputError("the `folder` dataset needs a root folder")
        return load_image_folder(root, size=size, channels=channels, labels=labels, seed=seed)
    return toy_2d(name, seed=seed or 0)
