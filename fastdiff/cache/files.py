"""Cache fits as files (what ``fastdiff cache`` writes): a TeaCache-style calibration as JSON, and a HarmoniCa router
as safetensors next to a JSON training record. Existing files are never replaced unless asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastdiff.errors import InputError

__all__ = ["refuse_overwrite", "router_record_path", "save_calibration", "save_router"]


def refuse_overwrite(paths: list[Path], overwrite: bool) -> None:
    """An error naming the ``paths`` that exist, unless ``overwrite``."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise InputError(f"{', '.join(existing)} already exist(s); pass --overwrite or another --out")


def router_record_path(router_path: str | Path) -> Path:
    """Where the training record of the router at ``router_path`` goes: ``<stem>_training.json`` beside it (never
    the router file itself)."""
    path = Path(router_path)
    return path.with_name(path.stem + "_training.json")


def save_calibration(fit: dict, path: str | Path) -> Path:
    """Write a fit of :func:`fastdiff.cache.calibrate` as JSON (read back by :func:`fastdiff.cache.load_calibration`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fit, indent=1) + "\n")
    return path


def save_router(router: Any, record: dict, path: str | Path) -> Path:
    """Save a router trained by :func:`fastdiff.cache.train_router` at ``path`` and its training record (with the
    router's settings and model) at :func:`router_record_path`; returns the record's path."""
    router.save(path)
    record_path = router_record_path(path)
    record_path.write_text(json.dumps({"config": router.meta, "model": router.model, **record}, indent=1) + "\n")
    return record_path
