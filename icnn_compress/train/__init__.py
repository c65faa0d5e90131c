"""The fine-tune loop (Trainer) and its callbacks."""

from icnn_compress.train._trainer import Callback, Trainer

__all__ = ["Callback", "Trainer"]
