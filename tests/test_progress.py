"""Progress bars show on a terminal only, unless asked for."""

import io

from icnn_compress._progress import PROGRESS_ENV, progress_bar


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _drawn(tty: bool, progress: bool) -> str:
    out = _Stream(tty)
    for _ in progress_bar(range(3), progress=progress, file=out, desc="work", mininterval=0):
        pass
    return out.getvalue()


def test_bars_only_on_a_terminal_unless_forced(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert "work" in _drawn(tty=True, progress=True)
    assert _drawn(tty=False, progress=True) == ""  # a log file or CI job: silent
    assert _drawn(tty=True, progress=False) == ""
    monkeypatch.setenv(PROGRESS_ENV, "always")
    assert "work" in _drawn(tty=False, progress=True)
    assert _drawn(tty=False, progress=False) == ""  # the caller's progress=False still wins
