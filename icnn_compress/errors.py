"""Typed exceptions: every user-facing error of the toolkit derives from ``IcnnCompressError``."""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "ICNNError", "IcnnCompressError", "TrainingError"]


class IcnnCompressError(Exception):
    """Base class of the toolkit's errors."""


class ConfigError(IcnnCompressError, ValueError):
    """A parameter, recipe key or option has a value that is not allowed."""


class ICNNError(ConfigError):
    """Bad input to the interpretable filter loss (layer names, targets, maps)."""


class DataError(IcnnCompressError, ValueError):
    """A dataset is missing or malformed."""


class TrainingError(IcnnCompressError, RuntimeError):
    """Training cannot go on (for example the loss became NaN or infinite)."""
