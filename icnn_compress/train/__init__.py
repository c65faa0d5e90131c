"""The fine-tune loop (Trainer), its callbacks, and knowledge distillation."""

from icnn_compress.train._distill import Distillation, distillation_loss, frozen_copy
from icnn_compress.train._tensorboard import TensorBoardLogger, tensorboard_available
from icnn_compress.train._trainer import Callback, Trainer

__all__ = [
    "Callback",
    "Distillation",
    "TensorBoardLogger",
    "Trainer",
    "distillation_loss",
    "frozen_copy",
    "tensorboard_available",
]
