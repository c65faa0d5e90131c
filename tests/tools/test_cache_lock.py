"""Two benchmark runs never write the same cache: the second stops with one line and touches nothing."""

import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from _common import exclusive  # noqa: E402


def test_a_held_lock_stops_the_second_holder_and_is_released_after(tmp_path):
    lock = tmp_path / "rows_m.lock"
    with exclusive(lock), pytest.raises(SystemExit, match=r"rows_m\.lock"), exclusive(lock):
        pass
    with exclusive(lock):  # released by the first block
        pass


def test_the_lock_is_released_when_the_block_fails(tmp_path):
    lock = tmp_path / "rows_m.lock"
    with pytest.raises(ValueError), exclusive(lock):
        raise ValueError("boom")
    with exclusive(lock):
        pass


def test_a_second_base_training_on_the_same_cache_stops_before_any_work(tmp_path):
    weights = tmp_path / "base.pt"
    with FileLock(str(weights.with_suffix(".lock")), timeout=0):
        done = subprocess.run(
            [
                sys.executable,
                str(ROOT / "tools" / "bench_fashion.py"),
                "--model",
                "vgg_small",
                "--cache",
                str(weights),
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "base.lock" in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.lock"]


@pytest.mark.parametrize("worker", ["2/2", "a/b"])
def test_a_bad_worker_split_is_refused_in_one_line(worker):
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_criteria.py"), "--worker", worker],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--worker must be K/N with 0 <= K < N (e.g. 0/2); got {worker!r}" in done.stderr.splitlines()[-1]
