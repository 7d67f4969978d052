"""What every benchmark shares: the machine record, number formatting, atomic writes, the FID protocol tag."""

from __future__ import annotations

import json
import os
import statistics
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any


from fastdiff.errors import InputError
from fastdiff.machine import machine

__all__ = ["BENCH_DIR", "RECIPES_DIR", "FID_SCORED_AS", "machine", "mean_std", "fmt", "atomic_write", "recipe_file", "Cells"]

# Defaults relative to the current directory (a checkout's root reproduces the repository's files); nothing is ever
# written next to the installed package.
BENCH_DIR = Path("benchmarks")
RECIPES_DIR = Path("recipes")
FID_SCORED_AS = "uint8 pixels, as saved"  # recorded in every benchmark JSON (see fastdiff.images.to_pixels)


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


class Cells:
    """The finished cells of a long benchmark, appended to a JSON-lines file as each one finishes, so that a run
    killed half-way continues where it stopped (``fastdiff bench NAME --resume``) instead of starting over.

    ``cells(key, compute)`` returns the value stored under ``key`` when resuming, else ``compute()`` (JSON-able),
    stored at once. ``path=None``: nothing is stored (a plain run). A file left by an interrupted run is never
    silently replaced: without ``resume`` it is refused, naming the file and the two ways on. :meth:`done` removes
    it once the benchmark's JSON is written.

    ``shard=(i, k)``: this process computes only the cells whose key hashes to ``i`` modulo ``k`` (the others return
    ``None``), so ``k`` processes on one file split a benchmark; a plain ``--resume`` run then assembles the JSON.
    ``finished_only``: nothing is computed, every cell not in the file returns ``None`` (assembling what is finished).
    A line is appended with one ``write`` on a file opened for appending, so concurrent shards do not interleave."""

    def __init__(self, path: Path | None, resume: bool = False, shard: tuple[int, int] | None = None, finished_only: bool = False):
        self.path, self.found, self.shard, self.finished_only = path, {}, shard, finished_only
        self.resume = resume or shard is not None or finished_only  # shards share the file
        if path is None or not path.is_file():
            return
        if not self.resume:
            raise InputError(f"{path} holds the finished cells of an interrupted run; pass --resume to continue it, "
                             "or delete the file to start over")  # fmt: skip
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill: that cell runs again
                continue
            self.found[record["key"]] = record["value"]

    def __call__(self, key: str, compute: Callable[[], Any], every_shard: bool = False) -> Any:
        """``every_shard``: a cell every shard needs (computed by each that lacks it) rather than one to split."""
        if key in self.found:
            return self.found[key]
        if self.finished_only:
            return None
        if self.shard is not None and not every_shard and zlib.crc32(key.encode()) % self.shard[1] != self.shard[0]:
            return None  # another shard's cell
        value = compute()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "value": value}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.found[key] = value
        return value

    def done(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
