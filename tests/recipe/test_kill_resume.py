"""kill -9 at a random point inside every stage, resume, and get the same artefacts bit for bit.

A child process runs ``prune-recipe run`` with a tick counter on every module call and every
atomic file replace; in the stage chosen for it, it SIGKILLs itself at a random tick. A first
child counts the ticks of each stage (and is the uninterrupted reference). Then one chain of
children: kill inside finetune, resume and kill inside analyse, ... kill inside report, resume to
the end. The final artefacts must equal the reference's byte for byte (timings aside).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml

from icnn_compress.recipe import STAGES

from .test_cli import TINY

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from icnn_compress.recipe import _stages
    from icnn_compress.cli import main

    kill_stage, kill_at, counts_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    state = {"stage": None, "ticks": {}}

    def tick():
        stage = state["stage"]
        if stage is None:
            return
        n = state["ticks"][stage] = state["ticks"].get(stage, 0) + 1
        if stage == kill_stage and n >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(name, fn):
        def run(*args, **kwargs):
            state["stage"] = name
            try:
                return fn(*args, **kwargs)
            finally:
                state["stage"] = None
        return run

    for name, fn in list(_stages.STAGE_FUNCTIONS.items()):
        _stages.STAGE_FUNCTIONS[name] = wrap(name, fn)
    call = torch.nn.Module.__call__
    def counted_call(self, *args, **kwargs):
        tick()
        return call(self, *args, **kwargs)
    torch.nn.Module.__call__ = counted_call
    replace = os.replace
    def counted_replace(src, dst, *args, **kwargs):
        tick()
        return replace(src, dst, *args, **kwargs)
    os.replace = counted_replace
    code = main(sys.argv[4:])
    with open(counts_file, "w") as f:
        json.dump(state["ticks"], f)
    sys.exit(code)
    """
)

ARTEFACTS = [
    "1_finetune/model.pt",
    "2_analyse/analysis.json",
    "3_prune/pruned.pt",
    "3_prune/prune.json",
    "4_recover/recovered.pt",
    "5_export/unpruned.onnx",
    "5_export/model.onnx",
]


def _child(tmp_path, kill_stage: str, kill_at: int, args: list[str]) -> tuple[int, dict]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    counts = tmp_path / "counts.json"
    counts.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), kill_stage, str(kill_at), str(counts), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    ticks = json.loads(counts.read_text()) if counts.is_file() else {}
    return proc.returncode, {"ticks": ticks, "stderr": proc.stderr}


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_kill_at_random_points_in_every_stage_then_resume_is_bit_identical(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    data = json.loads(json.dumps(TINY))
    data["analysis"]["pictures"] = True
    # keep_float="auto" (the default) times this machine once per model: the resumed runs reuse
    # the reference run's choice from the cache the children share (this test's own)
    recipe.write_text(yaml.safe_dump(data))
    ref = tmp_path / "ref"
    code, out = _child(tmp_path, "none", 0, ["run", str(recipe), "--out", str(ref), "--quiet"])
    assert code == 0, out["stderr"]
    ticks = out["ticks"]
    assert set(ticks) == set(STAGES), ticks  # every stage has points to kill at

    rng = random.Random(12)
    run = tmp_path / "chain"
    killed_at = {}
    for i, stage in enumerate(STAGES):
        at = rng.randint(1, ticks[stage])
        args = ["run", str(recipe), "--out", str(run), "--quiet"] + (["--resume"] if i else [])
        code, out = _child(tmp_path, stage, at, args)
        assert code == -signal.SIGKILL, f"not killed inside {stage} at tick {at}: rc {code} {out['stderr']}"
        assert not (run / f"{STAGES.index(stage) + 1}_{stage}" / "manifest.json").exists()
        killed_at[stage] = f"{at}/{ticks[stage]}"
    code, out = _child(tmp_path, "none", 0, ["run", str(recipe), "--out", str(run), "--quiet", "--resume"])
    assert code == 0, out["stderr"]

    for rel in ARTEFACTS:
        assert _digest(run / rel) == _digest(ref / rel), f"{rel} differs (kills at {killed_at})"
    pngs = sorted(p.name for p in (ref / "2_analyse").glob("*.png"))
    assert pngs and all(_digest(run / "2_analyse" / p) == _digest(ref / "2_analyse" / p) for p in pngs)
    a = json.loads((ref / "7_measure" / "measurements.json").read_text())
    b = json.loads((run / "7_measure" / "measurements.json").read_text())
    assert [e["accuracy"] for e in a] == [e["accuracy"] for e in b]
    # the INT8 choice was timed by the reference run and reused by the resumed quantize stage
    assert json.loads((run / "6_quantize" / "quantize.json").read_text())["precision"]["cached"] is True
    assert (run / "8_report" / "report.html").is_file()
    assert not list(run.rglob(".*.tmp")), "temp files of killed writes were left behind"
