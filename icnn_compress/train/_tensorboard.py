"""Optional TensorBoard logging of the Trainer's per-epoch metrics."""

from __future__ import annotations

import numbers
import os
from pathlib import Path

from icnn_compress import _dist
from icnn_compress.errors import ConfigError
from icnn_compress.train._trainer import Callback

__all__ = ["TensorBoardLogger", "tensorboard_available"]


def tensorboard_available() -> bool:
    """True when the ``tensorboard`` package (which ``torch.utils.tensorboard`` needs) is installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardLogger(Callback):
    """A Trainer callback that writes every numeric metric of each epoch (``train_loss``,
    ``train_extra_loss``, ``train_acc``, ``lr``, ``val_loss``, ``val_acc``, ...) as a TensorBoard
    scalar at step = epoch (from 1), on rank 0 only. View with ``tensorboard --logdir <log_dir>``.

    Args:
        log_dir: folder of the event files (created on the first epoch).
        prefix: put before every tag, e.g. ``"finetune/"``.

    Raises ``ConfigError`` when the ``tensorboard`` package is not installed
    (``pip install icnn-compress[tensorboard]``).
    """

    def __init__(self, log_dir: str | os.PathLike, *, prefix: str = "") -> None:
        if not tensorboard_available():
            raise ConfigError(
                "TensorBoard logging needs the 'tensorboard' package: "
                "pip install 'icnn-compress[tensorboard]' (or pip install tensorboard)."
            )
        self.log_dir = Path(log_dir)
        self.prefix = prefix
        self._writer = None

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> None:
        if _dist.rank() != 0:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir))
        for key, value in metrics.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._writer.add_scalar(f"{self.prefix}{key}", float(value), epoch + 1)
        self._writer.flush()

    def on_fit_end(self, trainer) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
