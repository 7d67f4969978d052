"""Training: one loop (:func:`~fastdiff.training.trainer.train`, accelerate) hosting every objective, its
checkpoints and EMA, the typed recipe loader, and the recipes that build an objective and run it (teachers,
consistency students, LCM-LoRA)."""

from fastdiff.training.config import load_config
from fastdiff.training.trainer import OptimConfig, TrainerConfig, TrainingStopped, train

__all__ = ["OptimConfig", "TrainerConfig", "TrainingStopped", "train", "load_config"]
