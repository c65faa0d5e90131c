"""Fuzzing the CLI (bounded, seeded by hypothesis): recipes, --set values, file contents and
argument lists. Every case must exit 0/1/2/3 with at most one line on stderr, execute nothing
from a file, and touch nothing outside its run directory."""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icnn_compress.cli import main

from ..recipe.test_cli import TINY

FAST = {**TINY, "finetune": {"epochs": 0}, "recover": {"epochs": 0}}
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Payload:
    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, int]:
    out = {}
    for p in root.rglob("*"):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[str(p.relative_to(root))] = p.stat().st_mtime_ns if p.is_file() else -1
    return out


def _check(capsys, code) -> None:
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code in (0, 1, 2, 3), (code, captured.err)
    assert len(lines) <= 1, captured.err
    assert "Traceback" not in captured.err


@pytest.fixture(scope="module")
def pruned_file(tmp_path_factory) -> Path:
    """A real pruned model file (from a run with no training)."""
    tmp = tmp_path_factory.mktemp("fuzz_src")
    recipe = tmp / "fast.yaml"
    recipe.write_text(yaml.safe_dump(FAST))
    run = tmp / "run"
    assert main(["run", str(recipe), "--out", str(run), "--quiet", "--stages", "finetune,prune"]) == 0
    return run / "3_prune" / "pruned.pt"


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
_values = st.recursive(
    _scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)
_sections = st.sampled_from([*FAST, "bogus"])


@SETTINGS
@given(section=_sections, key=st.one_of(st.text(max_size=10), st.sampled_from(["name", "epochs", "layers"])),
       value=_values, command=st.sampled_from(["validate", "run"]))  # fmt: skip
def test_fuzzed_recipes(capsys, section, key, value, command):
    data = json.loads(json.dumps(FAST))
    node = data.get(section)
    if isinstance(node, dict):
        keys = [*node, key]
        node[keys[len(key) % len(keys)]] = value
    else:
        data[section] = value
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe = root / "r.yaml"
        recipe.write_text(yaml.safe_dump(data))
        run = root / "run"
        before = _snapshot(root)
        args = [command, str(recipe)]
        if command == "run":
            args += ["--out", str(run), "--quiet", "--stages", "finetune"]
        _check(capsys, main(args))
        assert _snapshot(root, skip=run) == before


_set_keys = st.one_of(
    st.sampled_from(
        ["name", "seed", "data.batch_size", "data.image_size", "icnn.layers", "icnn.weight",
         "prune.macs_reduction", "finetune.lr", "measure.batch_sizes", "data", "model.name", "export.opset",
         "a.b.c", "data.name.x", ""]
    ),
    st.text(max_size=15),
)  # fmt: skip
_set_values = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        ["!!python/object/apply:os.system ['touch x']", "&a [*a]", "[", "{", ".inf", "-.nan", "1e400", "~",
         "[1, 2, 3]", "{a: 1}", "'", "0x10", "!!binary aGVsbG8=", "2026-01-01", "../x"]
    ),
)  # fmt: skip


@SETTINGS
@given(overrides=st.lists(st.tuples(_set_keys, _set_values), min_size=1, max_size=3))
def test_fuzzed_set_values(capsys, overrides):
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "r.yaml"
        recipe.write_text(yaml.safe_dump(FAST))
        args = ["validate", str(recipe)]
        for k, v in overrides:
            args += ["--set", f"{k}={v}"]
        _check(capsys, main(args))
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["r.yaml"]


@SETTINGS
@given(
    kind=st.sampled_from(["random", "truncated", "flipped", "pickle", "zip-pickle"]),
    blob=st.binary(max_size=300),
    cut=st.floats(0, 1),
    command=st.sampled_from(["export", "bench", "validate", "report", "trainer-resume"]),
)
def test_fuzzed_file_contents(capsys, pruned_file, kind, blob, cut, command):
    good = pruned_file.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        flag = root / "EXECUTED"
        f = root / "input.bin"
        if kind == "random":
            f.write_bytes(blob)
        elif kind == "truncated":
            f.write_bytes(good[: int(len(good) * cut)])
        elif kind == "flipped":
            data = bytearray(good)
            for i, b in enumerate(blob[:64]):
                data[(int(len(data) * cut) + i * 97) % len(data)] ^= b | 1
            f.write_bytes(bytes(data))
        elif kind == "pickle":
            f.write_bytes(pickle.dumps({"state_dict": Payload(flag)}))
        else:
            torch.save({"state_dict": Payload(flag)}, f)
        if command == "export":
            args = ["export", str(f), str(root / "out.onnx")]
        elif command == "bench":
            args = ["bench", str(f), "--repeats", "1", "--batch-sizes", "1"]
        elif command == "validate":
            args = ["validate", str(f)]
        elif command == "report":
            run = root / "run"
            run.mkdir()
            (run / ".icnn-compress-run").write_bytes(f.read_bytes())
            (run / "recipe.resolved.json").write_bytes(f.read_bytes())
            args = ["report", str(run)]
        else:
            from torch.utils.data import DataLoader, TensorDataset

            from icnn_compress import Trainer, models

            ckpt = root / "t" / "checkpoints"
            ckpt.mkdir(parents=True)
            (ckpt / "last.pt").write_bytes(f.read_bytes())
            x = torch.rand(8, 3, 16, 16)
            dl = DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=8)
            model = models.create("vgg_small", num_classes=2, in_channels=3)
            Trainer(model, dl, epochs=1, out_dir=root / "t", resume=True, progress=False).fit()
            assert (ckpt / "last.pt.stale-1").is_file()
            capsys.readouterr()  # the Trainer's warning that it set the checkpoint aside (expected)
            args = None
        if args is not None:
            _check(capsys, main(args))
        assert not flag.exists(), "a pickle payload was executed"
        assert not (root / "out.onnx").exists() or kind in ("truncated", "flipped")


_tokens = st.sampled_from(
    ["--set", "data.batch_size=0", "name=../x", "--out", "OUT", "FILE", "--stages", "prune",
     "finetune,report", "--device", "banana", "cpu", "--resume", "--force", "--batch-sizes", "0", "a",
     "--threads", "-1",
     "--opset", "99", "--criteria", "l1,nope", "--input-shape", "3,16", "--repeats", "1", "RECIPE", "", "-",
     "--debug", "--quiet", "--bogus", "\x00", "/", "."]
)  # fmt: skip


@SETTINGS
@given(
    command=st.sampled_from(["run", "validate", "show", "list", "bench", "export", "report", "compare", "x"]),
    tokens=st.lists(_tokens, max_size=6),
)
def test_fuzzed_arguments(capsys, monkeypatch, command, tokens):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        work = root / "work"
        work.mkdir()
        monkeypatch.chdir(work)
        recipe = root / "r.yaml"
        recipe.write_text(yaml.safe_dump(FAST))
        (root / "file").write_text("not a model")
        subst = {"OUT": str(root / "out"), "FILE": str(root / "file"), "RECIPE": str(recipe)}
        args = [command, *(subst.get(t, t) for t in tokens)]
        if command in ("run", "compare"):  # keep the fuzz fast: no training
            args += ["--stages", "finetune"] if command == "run" else []
        before = _snapshot(root)
        code = main(args)
        _check(capsys, code)
        after = _snapshot(root)
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        allowed = ("out", "work/runs")
        assert all(k.startswith(allowed) for k in changed), changed
