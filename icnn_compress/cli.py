"""The ``prune-recipe`` command.

Not implemented yet: the recipe runner lands with the "Recipes and the prune-recipe CLI" issue.
Until then the command prints its planned usage and exits with status 2.
"""

from __future__ import annotations

import sys

USAGE = """usage: prune-recipe {run,validate,show,list,compare,export,bench,report} ...

NOTE: prune-recipe is not implemented yet in this version of icnn-compress; only this help
exists. Use the Python API (see README.md) until the recipe runner lands.
"""


def main(argv: list[str] | None = None) -> int:
    """Print the planned usage; exit 0 for --help, 2 otherwise (not implemented)."""
    argv = sys.argv[1:] if argv is None else argv
    sys.stdout.write(USAGE)
    return 0 if argv in ([], ["-h"], ["--help"]) else 2


if __name__ == "__main__":
    raise SystemExit(main())
