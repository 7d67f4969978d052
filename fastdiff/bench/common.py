"""What every benchmark shares: the machine record, number formatting, atomic writes, the FID protocol tag."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fastdiff.errors import InputError

__all__ = ["BENCH_DIR", "RECIPES_DIR", "FID_SCORED_AS", "machine", "mean_std", "fmt", "atomic_write", "recipe_file"]

# Defaults relative to the current directory (a checkout's root reproduces the repository's files); nothing is ever
# written next to the installed package.
BENCH_DIR = Path("benchmarks")
RECIPES_DIR = Path("recipes")
FID_SCORED_AS = "uint8 pixels, as saved"  # recorded in every benchmark JSON (see fastdiff.images.to_pixels)


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "device": "cuda" if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and the values themselves."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def fmt(x: float) -> str:
    """Three significant digits, scientific below 1e-3."""
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (creating its folder) through a temporary file, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def recipe_file(name: str, recipes_dir: str | Path = RECIPES_DIR) -> Path:
    """The recipe a benchmark trains: ``recipes/<file>`` (as the repository names it) looked up in ``recipes_dir``.

    Recipes are user files, not package data: a benchmark that trains one reads it from a checkout's ``recipes/``
    (the default, relative to the current directory) or from the folder given with ``fastdiff bench --recipes``."""
    path = Path(recipes_dir) / Path(name).name
    if not path.is_file():
        raise InputError(f"no recipe {path}; run from a fastdiff checkout or pass --recipes DIR (a copy of the repository's recipes/)")
    return path
