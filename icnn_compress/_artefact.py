"""Checksummed artefacts: every ``.pt`` the toolkit writes says what it is and proves it is intact.

An artefact is a ``torch.save`` of a plain dict (tensors, strings, numbers, lists, dicts) with one
extra key, ``"artefact"``: ``{"kind", "toolkit_version", "sha256", ...}``. The SHA-256 covers every
other key, tensors by dtype, shape and raw bytes, so a flipped byte anywhere in the weights is caught
even when the zip container still opens. Files load with ``torch.load(weights_only=True)`` only: a
pickle that is not plain weights is refused with a one-line ``DataError``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from icnn_compress._io import atomic_save
from icnn_compress._version import __version__
from icnn_compress.errors import DataError

__all__ = ["ARTEFACT_KEY", "digest", "load_artefact", "read_weights_file", "save_artefact"]

ARTEFACT_KEY = "artefact"


def _feed(h: Any, obj: Any) -> None:
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            h.update(f"K{type(k).__name__}:{k}".encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, bytes):
        h.update(b"B" + obj)
    else:  # str, int, float, bool, None, torch.Size, dtypes: their repr is exact
        h.update(f"V{type(obj).__name__}:{obj!r}".encode())


def digest(obj: Any) -> str:
    """SHA-256 (hex) of a nested structure of tensors and plain values (tensor bytes included)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def save_artefact(record: dict, path: str | os.PathLike, *, kind: str, **info: Any) -> None:
    """Atomically write ``record`` with its kind, the toolkit version, ``info`` and a checksum."""
    if ARTEFACT_KEY in record:
        raise ValueError(f"record must not hold the key {ARTEFACT_KEY!r}")
    header = {"kind": kind, "toolkit_version": __version__, **info, "sha256": digest(record)}
    atomic_save({**record, ARTEFACT_KEY: header}, path)


def read_weights_file(path: str | os.PathLike, *, what: str = "file", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line ``DataError`` messages for a missing,
    truncated, corrupt or non-weights (arbitrary pickle) file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {str(path)!r} does not exist or is not a file.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        kind = type(exc).__name__
        raise DataError(
            f"{what} {str(path)!r} cannot be read as plain weights ({kind}): it is truncated, "
            "corrupt, or a pickle of arbitrary objects, which is never loaded."
        ) from None


def load_artefact(
    path: str | os.PathLike,
    *,
    kind: str | tuple[str, ...],
    what: str = "file",
    map_location: Any = "cpu",
    allow_legacy: bool = False,
) -> dict:
    """Load and verify an artefact written by ``save_artefact``; returns the record (header under
    ``record["artefact"]``). ``allow_legacy`` accepts a record without a header (older versions)."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    record = read_weights_file(path, what=what, map_location=map_location)
    if not isinstance(record, dict):
        raise DataError(
            f"{what} {str(path)!r} is not a file written by icnn-compress (expected a {kinds[0]})."
        )
    header = record.get(ARTEFACT_KEY)
    if header is None:
        if allow_legacy:
            return record
        raise DataError(f"{what} {str(path)!r} has no icnn-compress checksum header (expected a {kinds[0]}).")
    if not isinstance(header, dict) or header.get("kind") not in kinds:
        got = header.get("kind") if isinstance(header, dict) else None
        raise DataError(f"{what} {str(path)!r} holds a {got!r}, not a {' or '.join(kinds)}.")
    body = {k: v for k, v in record.items() if k != ARTEFACT_KEY}
    if digest(body) != header.get("sha256"):
        raise DataError(
            f"{what} {str(path)!r} fails its checksum: the file was changed or corrupted after it "
            "was written. Use an intact copy or run the stage that wrote it again."
        )
    return record
