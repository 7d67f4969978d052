"""Atomic, verifiable training checkpoints on top of ``accelerator.save_state``.

A checkpoint is a folder ``step_NNNNNNNN`` holding accelerate's state (weights as safetensors; optimiser, scheduler
and RNG states loaded with ``weights_only``), the EMA weights (safetensors) and a manifest: the step, the recipe it
belongs to and the SHA-256 of every file. It is written under a temporary name and renamed when complete, so a killed
run leaves either a whole checkpoint or none; :func:`find_checkpoint` skips (and reports) any whose files do not
match their manifest, and refuses one written by another recipe.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from fastdiff.errors import InputError

__all__ = ["MANIFEST", "save_checkpoint", "find_checkpoint", "latest_good", "load_data_state"]

MANIFEST = "fastdiff_checkpoint.json"
DATA_STATE = "data_state_{rank}.pt"  # per process: where a streaming batch source stands

def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}  # fmt: skip


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, fingerprint: dict, keep: int, ema, data_state: dict | None = None,
                    elapsed_s: float | None = None) -> Path:  # fmt: skip
    """``save_state`` and the EMA (safetensors) into ``.tmp-step_N``, a manifest (step, recipe, file hashes, the
    training seconds spent up to this step over all resumed pieces), then an atomic rename; old checkpoints beyond
    ``keep`` are removed."""
    from safetensors.torch import save_file

    final, tmp = ckpt_dir / f"step_{step:08d}", ckpt_dir / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if data_state is not None:  # each process its own (a streaming source's position)
        torch.save(data_state, tmp / DATA_STATE.format(rank=accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in ema.model.state_dict().items()}, tmp / "ema.safetensors")
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "recipe": fingerprint, "files": _digest(tmp), "elapsed_s": elapsed_s}, indent=1))
        if final.exists():  # a corrupt checkpoint of the same step that resume skipped: replace it
            stale = ckpt_dir / f".stale-step_{step:08d}"
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            tmp.rename(final)
            shutil.rmtree(stale)
        else:
            tmp.rename(final)
        for old in sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _check(folder: Path, fingerprint: dict) -> str | None:
    """Why ``folder`` is not a usable checkpoint, or None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return "no readable manifest (interrupted while writing?)"
    # keys the fingerprint no longer has (sections of other objectives an older fastdiff included) are not compared
    theirs = {k: v for k, v in manifest.get("recipe", {}).items() if k in fingerprint}
    if theirs != fingerprint:
        keys = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
        raise InputError(f"{folder} was written by a different recipe (differs in: {', '.join(keys)}); use a new output_dir")
    actual = _digest(folder)
    for name, digest in manifest["files"].items():
        if actual.get(name) != digest:
            return f"{name} is {'missing' if name not in actual else 'corrupt (hash mismatch)'}"
    return None


def latest_good(ckpt_dir: Path, fingerprint: dict) -> Path | None:
    if not ckpt_dir.is_dir():
        return None
    for folder in sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), reverse=True):
        if _check(folder, fingerprint) is None:
            return folder
    return None


def find_checkpoint(ckpt_dir: Path, fingerprint: dict, resume: str, log: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from: ``resume`` is ``"latest"`` (the newest intact one; corrupt ones are reported
    and skipped; None when there is none) or a folder."""
    if resume != "latest":
        folder = Path(resume)
        reason = _check(folder, fingerprint) if folder.is_dir() else "not a folder"
        if reason:
            raise InputError(f"cannot resume from {folder}: {reason}")
        return folder
    if not ckpt_dir.is_dir():
        log(f"no checkpoints in {ckpt_dir}; starting from step 0")
        return None
    for folder in sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), reverse=True):
        reason = _check(folder, fingerprint)
        if reason is None:
            return folder
        log(f"skipping checkpoint {folder}: {reason}")
    log(f"no intact checkpoint in {ckpt_dir}; starting from step 0")
    return None


def load_data_state(folder: Path, rank: int) -> dict | None:
    """The batch source state process ``rank`` saved in checkpoint ``folder`` (None when its source saved none)."""
    path = folder / DATA_STATE.format(rank=rank)
    return torch.load(path, weights_only=True) if path.is_file() else None
