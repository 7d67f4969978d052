"""Where the shipped assets live: the teachers (diffusers pipeline folders) and the domain feature extractors."""

from __future__ import annotations

from pathlib import Path

from fastdiff.errors import InputError

__all__ = ["ASSETS", "TEACHERS", "teacher_path"]

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"
TEACHERS = ("fashion-mnist", "digits")


def teacher_path(name: str) -> Path:
    """The folder of a shipped teacher pipeline (``fashion-mnist`` or ``digits``)."""
    if name not in TEACHERS:
        raise InputError(f"unknown teacher {name!r}; expected one of {', '.join(TEACHERS)}")
    path = ASSETS / "teachers" / name
    if not (path / "model_index.json").is_file():
        raise InputError(f"the shipped teacher {path} is missing; retrain it with `fastdiff train recipes/teacher_{name.replace('-', '_')}.yaml`")
    return path
