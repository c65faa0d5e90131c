"""Files the way the toolkit writes them, for scripts built on it: atomic writes (a temporary file
in the same folder, fsync, rename: a reader never sees half a file) and the environment record
that every benchmark result carries.

Example:
    >>> from icnn_compress.io import atomic_write_json, environment_info
    >>> atomic_write_json({"environment": environment_info()}, "result.json")
"""

from icnn_compress._io import atomic_save, atomic_write_bytes, atomic_write_json, environment_info

__all__ = ["atomic_save", "atomic_write_bytes", "atomic_write_json", "environment_info"]
