"""The run directory: its marker, lock, stage folders, manifests and checksums.

Guarantees (what ``--force`` and ``--resume`` rely on):

* A run directory is recognised by the marker file ``.icnn-compress-run`` that the runner writes
  when it creates the directory. ``replace`` (``--force``) removes only the entries the runner
  writes, in a directory that carries the marker or is empty; never ``/``, the home directory, the
  working directory or one of its ancestors, a symlink, or a directory holding files it did not write.
* One process at a time: an OS file lock (``filelock``), released by the kernel even on ``kill -9``.
* A stage is finished when its ``manifest.json`` (written last, atomically) carries the stage's key
  and every file it lists still has the recorded SHA-256.
* A stage folder left by a different key (the recipe or an input changed) is moved to ``.stale/``,
  never reused; temp files of a killed atomic write are removed before the stage runs again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from filelock import FileLock, Timeout

from icnn_compress._io import atomic_write_json, environment_info, sha256_file
from icnn_compress._version import __version__
from icnn_compress.errors import ConfigError, IcnnCompressError

__all__ = ["MARKER", "LockError", "RunDirectory", "sha256_file"]

MARKER = ".icnn-compress-run"
LOCK = ".lock"
STALE = ".stale"
RESOLVED = "recipe.resolved.json"
_EXTRA_ENTRIES = {MARKER, LOCK, STALE, RESOLVED, "compare"}


class LockError(IcnnCompressError):
    """Another run holds the run directory."""


def _protected(path: Path) -> str | None:
    """Why ``path`` must never be replaced, or ``None``."""
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "it is the file system root"
    if resolved == Path.home().resolve():
        return "it is the home directory"
    if resolved == cwd or resolved in cwd.parents:
        return "it is the working directory or one of its ancestors"
    return None


class RunDirectory:
    """The folder of one run: ``<n>_<stage>/`` folders, the resolved recipe, marker and lock.

    Args:
        path: the run directory.
        stages: the stage names in order (folder ``i_<stage>`` for the i-th, from 1).
    """

    def __init__(self, path: str | os.PathLike, stages: tuple[str, ...]) -> None:
        self.path = Path(path)
        self.stages = stages
        self._lock: FileLock | None = None

    # ----- checks (read only) -----
    @property
    def is_run_directory(self) -> bool:
        return (self.path / MARKER).is_file()

    def _known(self, name: str) -> bool:
        """An entry the runner writes: the marker, lock, resolved recipe, or ``<n>_<stage>`` folders
        (any ``n``: version 0.x numbered the stages without ``quantize``)."""
        number, _, stage = name.partition("_")
        return name in _EXTRA_ENTRIES or (number.isdigit() and stage in self.stages)

    def check(self, *, resume: bool, force: bool) -> None:
        """Refuse, before anything is written, a run directory that cannot be used as asked."""
        p = self.path
        if p.is_symlink():
            raise ConfigError(f"Run directory {str(p)!r} is a symbolic link; give the real path.")
        if p.exists() and not p.is_dir():
            raise ConfigError(f"Run directory {str(p)!r} is a file, not a directory; choose another --out.")
        for parent in p.absolute().parents:
            if parent.exists() and not parent.is_dir():
                raise ConfigError(f"Run directory {str(p)!r} cannot be created: {parent} is a file.")
        why = _protected(p) if force else None
        if why:
            raise ConfigError(f"--force refuses {str(p)!r}: {why}.")
        if not p.exists() or not any(p.iterdir()):
            return
        if not self.is_run_directory:
            raise ConfigError(
                f"{str(p)!r} is not empty and is not a run directory of icnn-compress (no {MARKER} "
                "marker): nothing in it is touched. Choose another --out."
            )
        if force:
            foreign = sorted(e.name for e in p.iterdir() if not self._known(e.name))
            if foreign:
                shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
                raise ConfigError(
                    f"--force refuses {str(p)!r}: it holds files the runner did not write ({shown}). "
                    "Move them away first or choose another --out."
                )
        elif not resume:
            raise ConfigError(
                f"Run directory {str(p)!r} exists: pass --resume to continue it or --force to replace it."
            )

    # ----- lifecycle -----
    def open(self, *, force: bool) -> None:
        """Create (or, with ``force``, empty) the directory, write the marker and take the lock.
        Call ``check`` first."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path / LOCK), timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            self._lock = None
            raise LockError(
                f"{self.path} is in use by another run; wait for it to finish or use another --out."
            ) from None
        if force:
            for entry in self.path.iterdir():
                if entry.name == LOCK or not self._known(entry.name):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        if not self.is_run_directory:
            atomic_write_json({"toolkit": "icnn-compress", "version": __version__}, self.path / MARKER)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- stages -----
    def stage_dir(self, stage: str) -> Path:
        return self.path / f"{self.stages.index(stage) + 1}_{stage}"

    def manifest(self, stage: str) -> dict | None:
        """The stage's manifest, or ``None`` when missing or unreadable."""
        f = self.stage_dir(stage) / "manifest.json"
        if not f.is_file():
            return None
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def finished(self, stage: str, key: str | None = None) -> tuple[bool, str]:
        """``(finished, why not)``: a manifest (with ``key`` when given) whose files verify."""
        data = self.manifest(stage)
        if data is None:
            exists = (self.stage_dir(stage) / "manifest.json").exists()
            return False, "its manifest is unreadable" if exists else "it has not run"
        if key is not None and data.get("key") != key:
            return False, "the recipe or its inputs changed"
        checksums = data.get("checksums")
        if not isinstance(checksums, dict):
            return False, "its manifest is unreadable"
        for rel, digest in checksums.items():
            f = self.stage_dir(stage) / str(rel)
            if not f.is_file() or sha256_file(f) != digest:
                return False, f"checksum mismatch for {rel}"
        return True, ""

    def begin_stage(self, stage: str, key: str) -> Path:
        """The stage folder, ready for a (re)run under ``key``: a folder of another key is moved to
        ``.stale/``, temp files of a killed write are removed, and the key is recorded."""
        out = self.stage_dir(stage)
        if out.exists():
            started = out / "stage.json"
            try:
                same = json.loads(started.read_text()).get("key") == key
            except (OSError, ValueError, AttributeError):
                same = False
            if not same:
                self._set_aside(out)
            else:
                (out / "manifest.json").unlink(missing_ok=True)
                for tmp in out.rglob(".*.tmp"):
                    if tmp.is_file():
                        tmp.unlink()
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json({"stage": stage, "key": key}, out / "stage.json")
        return out

    def _set_aside(self, folder: Path) -> Path:
        dest_dir = self.path / STALE
        dest_dir.mkdir(exist_ok=True)
        n = 1
        while (dest := dest_dir / f"{folder.name}-{n}").exists():
            n += 1
        folder.replace(dest)
        return dest

    def finish_stage(
        self, stage: str, key: str, files: list[str], info: dict, seconds: float, recipe_hash: str
    ) -> None:
        """Write the manifest (last, atomically): what makes the stage finished."""
        out = self.stage_dir(stage)
        atomic_write_json(
            {
                "stage": stage,
                "key": key,
                "recipe_hash": recipe_hash,
                "seconds": seconds,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": environment_info(),
                "info": info,
                "checksums": {f: sha256_file(out / f) for f in files},
            },
            out / "manifest.json",
        )
