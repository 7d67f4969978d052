"""Training objectives hosted by :func:`fastdiff.trainer.train` (see :mod:`fastdiff.objectives.base` for the contract)."""

from fastdiff.objectives.base import LossOutput, Objective, per_sample_rand, per_sample_randn
from fastdiff.objectives.consistency import (
    ClassConditioner,
    ConsistencyDistillation,
    ConsistencyTraining,
    TextConditioner,
)

__all__ = [
    "LossOutput", "Objective", "per_sample_rand", "per_sample_randn", "ConsistencyTraining", "ConsistencyDistillation",
    "ClassConditioner", "TextConditioner",
]  # fmt: skip
