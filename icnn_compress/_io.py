"""Atomic file writes and run provenance (machine, versions, threads)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "cpu_identity",
    "environment_info",
    "parse_cpuinfo",
    "sha256_file",
]


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    _atomic(Path(path), lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` atomically."""
    _atomic(Path(path), lambda f: f.write(data))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    _atomic(Path(path), lambda f: f.write(data))


# the instruction sets ONNX Runtime's CPU kernels dispatch on: a host that gains or loses one runs
# other kernels, so its tables are not this host's
_KERNEL_FLAGS = (
    *("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8"),
    *("asimddp", "i8mm", "sve"),  # Arm: dot product, int8 matrix multiply, scalable vectors
)


def parse_cpuinfo(text: str) -> tuple[str, str]:
    """``(CPU model name, the kernel-relevant instruction sets joined by "+")`` from the text of
    ``/proc/cpuinfo`` (x86 ``flags`` or Arm ``Features``); empty strings for what it lacks."""
    name, flags = "", ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            present = set(value.split())
            flags = "+".join(f for f in _KERNEL_FLAGS if f in present)
    return name, flags


@functools.lru_cache(maxsize=1)
def cpu_identity() -> tuple[str, str]:
    """This host's ``(CPU model, instruction sets)`` (``parse_cpuinfo``); off Linux the model is
    ``platform.processor()`` (or the architecture)."""
    try:
        name, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        name, flags = "", ""
    return name or platform.processor() or platform.machine(), flags


def environment_info() -> dict:
    """Machine, versions and thread counts, for every benchmark result."""
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_identity()[0],
        "cpu_flags": cpu_identity()[1],  # the instruction sets the kernels dispatch on
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the SIMD kernels torch uses
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod in ("torchvision", "torch_pruning", "onnx", "onnxruntime", "sklearn"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # optional for this record
            info[mod] = None
    return info


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
