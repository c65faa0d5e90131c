"""Progress bars (tqdm) that show where a person is watching.

A bar is drawn when the caller asks for progress *and* stderr is a terminal; in a log file or a CI
job it stays silent instead of writing thousands of carriage-return lines. Setting the environment
variable ``ICNN_COMPRESS_PROGRESS=always`` (``prune-recipe --progress``) draws bars anyway.
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm

__all__ = ["PROGRESS_ENV", "progress_bar"]

PROGRESS_ENV = "ICNN_COMPRESS_PROGRESS"


def progress_bar(iterable=None, *, progress: bool, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, disabled unless ``progress`` is true and stderr is a terminal
    (or the environment variable ``ICNN_COMPRESS_PROGRESS`` is ``always``)."""
    if not progress:
        disable: bool | None = True
    else:
        disable = False if os.environ.get(PROGRESS_ENV, "").lower() == "always" else None  # None: TTY only
    return tqdm(iterable, disable=disable, **kwargs)
