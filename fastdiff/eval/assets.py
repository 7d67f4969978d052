"""Where the shipped assets live: the teachers (diffusers pipeline folders) and the domain feature extractors.

They ship inside the package (``fastdiff/assets/``, package data), so a plain ``pip install`` finds them wherever it
is run from. Nothing is ever written there: every command writes to paths the user gives.
"""

from __future__ import annotations

from pathlib import Path

from fastdiff.errors import InputError

__all__ = ["ASSETS", "TEACHERS", "teacher_path", "teacher_dataset", "student_path", "shipped_schedule", "pipeline_path"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# shipped teacher -> the data set it models (its test split and domain extractor); fashion-mnist-dit is the earlier
# Fashion-MNIST teacher, kept for the cache benchmark's comparison with diffusers' transformer cache hooks
TEACHER_DATA = {"fashion-mnist": "fashion-mnist", "digits": "digits", "fashion-mnist-dit": "fashion-mnist"}
TEACHERS = tuple(TEACHER_DATA)


def teacher_path(name: str) -> Path:
    """The folder of a shipped teacher pipeline (``fashion-mnist``, ``digits`` or ``fashion-mnist-dit``)."""
    if name not in TEACHERS:
        raise InputError(f"unknown teacher {name!r}; expected one of {', '.join(TEACHERS)}")
    path = ASSETS / "teachers" / name
    if not (path / "model_index.json").is_file():
        raise InputError(f"the shipped teacher {path} is missing; reinstall fastdiff, or retrain it from a checkout with "
                         f"`fastdiff train recipes/teacher_{name.replace('-', '_')}.yaml`")  # fmt: skip
    return path


def teacher_dataset(name: str) -> str:
    """The data set a shipped teacher models: the name of its test split (``NAME:test``) and domain extractor."""
    teacher_path(name)  # an unknown name is refused the same way
    return TEACHER_DATA[name]


def student_path(teacher: str) -> Path | None:
    """The folder of the distilled student shipped for a shipped teacher (``assets/students/NAME``, the best student of
    `fastdiff bench distill`), or ``None`` where none ships."""
    teacher_path(teacher)  # an unknown name is refused the same way
    path = ASSETS / "students" / teacher
    return path if (path / "model_index.json").is_file() else None


def shipped_schedule(teacher: str, solver: str, steps: int, guidance: float) -> dict | None:
    """The optimised schedule shipped for a shipped teacher, solver, step count and guidance
    (``assets/teachers/NAME/schedules/SOLVER-STEPSnfe-wGUIDANCE.json``, made by `fastdiff schedule optimize`), or
    ``None`` where none ships."""
    from fastdiff.pipelines.schedule_files import check_schedule, read_schedule

    path = teacher_path(teacher) / "schedules" / f"{solver}-{steps}nfe-w{guidance:g}.json"
    if not path.is_file():
        return None
    record = read_schedule(path)
    check_schedule(record, teacher, solver, steps, where=str(path))
    if record.get("guidance") != guidance:
        raise InputError(f"{path} was optimised for guidance {record.get('guidance')}, not {guidance:g}; rename or remake it")
    return record


def pipeline_path(name_or_path: str | Path) -> Path:
    """A pipeline folder from what a user typed: a shipped teacher's name (``fashion-mnist``, ``digits``), an existing
    folder, or a path inside the package such as ``assets/teachers/digits`` (how recipes and older commands name the
    shipped teachers). Anything else is returned as given, for the loader to report."""
    if str(name_or_path) in TEACHERS:
        return teacher_path(str(name_or_path))
    path = Path(name_or_path)
    if not path.exists() and not path.is_absolute() and (ASSETS.parent / path).exists():
        return ASSETS.parent / path
    return path
