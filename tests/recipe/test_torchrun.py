"""prune-recipe run under torchrun: two gloo processes, as torchrun starts them (its environment
variables), train with DDP on every rank, and rank 0 alone writes the run directory; the run has
the artefacts of a one-process run, and an error on rank 0 stops both ranks before anything is
written."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp
import yaml

from icnn_compress.cli import main
from icnn_compress.recipe import _runner as runner

from .test_cli import TINY

STAGES = tuple(f"{i}_{stage}" for i, stage in enumerate(runner.STAGES, 1))  # the run's folders


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, args: list[str], codes: str) -> None:
    """One process as torchrun would start it."""
    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(1)
    code = main(args)
    Path(codes, f"rank{rank}").write_text(str(code))
    os._exit(0)  # skip interpreter teardown in spawned workers (gloo can abort there)


def _torchrun(args: list[str], tmp_path: Path, world: int = 2) -> list[int]:
    codes = tmp_path / "codes"
    codes.mkdir(exist_ok=True)
    mp.spawn(_rank, args=(world, _free_port(), args, str(codes)), nprocs=world, join=True)
    return [int((codes / f"rank{r}").read_text()) for r in range(world)]


def _manifests(run: Path) -> dict:
    return {s: json.loads((run / s / "manifest.json").read_text()) for s in STAGES}


@pytest.mark.slow
def test_two_processes_give_the_artefacts_of_one(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "batch_size": 16}}))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", str(recipe), "--out", str(one), "--quiet", "--device", "cpu"]) == 0
    assert _torchrun(["run", str(recipe), "--out", str(two), "--quiet", "--device", "cpu"], tmp_path) == [
        0,
        0,
    ]
    m1, m2 = _manifests(one), _manifests(two)
    for stage in STAGES:
        assert sorted(m2[stage]["checksums"]) == sorted(m1[stage]["checksums"]), stage
    # the same recipe sections (the later stages' keys also hold their inputs' checksums, which
    # differ: each rank trained on its shard, so the weights are not those of one process)
    assert m2["1_finetune"]["key"] == m1["1_finetune"]["key"]
    # every file verifies against its manifest (resume skips every stage)
    assert main(["run", str(recipe), "--out", str(two), "--resume", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("checksums verified: skipped") == len(STAGES)
    # each rank trained on its half of the 96 training images: 3 steps of 16 per epoch, not 6
    assert [(h["steps"], h["images"]) for h in m2["1_finetune"]["info"]["history"]] == [(3, 96)] * 2
    assert [(h["steps"], h["images"]) for h in m1["1_finetune"]["info"]["history"]] == [(6, 96)] * 2
    # the same widths after pruning (a MACs target with per-layer ranking), measured like one run
    measured = [json.loads((run / "7_measure" / "measurements.json").read_text()) for run in (one, two)]
    assert measured[1][1]["widths"] == measured[0][1]["widths"]
    assert [m["name"] for m in measured[1]] == [m["name"] for m in measured[0]]


@pytest.mark.slow
def test_an_error_on_rank_0_stops_both_ranks_and_writes_nothing(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("not a run directory")
    codes = _torchrun(["run", str(recipe), "--out", str(taken), "--quiet", "--device", "cpu"], tmp_path)
    assert codes == [2, 1]  # rank 0: the refusal (bad usage); rank 1: stopped with it
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]


def test_other_commands_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["validate", "quickstart"]) == 2
    assert "only 'prune-recipe run' runs under torchrun" in capsys.readouterr().err
