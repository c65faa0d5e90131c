"""Safe runs (issue 12): --force only replaces run directories, resume never reuses stale work,
artefacts are checksummed, and every user error is one line with exit code 2."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import yaml

from icnn_compress.cli import main
from icnn_compress.errors import ConfigError, DataError
from icnn_compress.prune import load_pruned
from icnn_compress.recipe import MARKER, Runner, load_recipe

from .test_cli import TINY


def _write(tmp_path, data=None, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data or TINY))
    return path


def _one_line_error(capsys, code, expected=2):
    err = capsys.readouterr().err
    assert code == expected, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prune-recipe") and ": error: " in lines[0], err
    assert "Traceback" not in err
    return lines[0]


class Payload:
    """A pickle whose loading would run code: it creates ``flag``."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A whole tiny run (shared by the read-only checks below)."""
    tmp = tmp_path_factory.mktemp("finished")
    recipe = _write(tmp)
    run = tmp / "run"
    assert main(["run", str(recipe), "--out", str(run), "--quiet"]) == 0
    return recipe, run


# ----- --force and the run directory -----
def test_force_never_deletes_a_folder_that_is_not_a_run_directory(tmp_path, capsys):
    victim = tmp_path / "v"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    recipe = _write(tmp_path)
    code = main(["run", str(recipe), "--set", "icnn.layers=[nope.layer]", "--out", str(victim), "--force"])
    assert "icnn.layers" in _one_line_error(capsys, code)
    code = main(["run", str(recipe), "--out", str(victim), "--force", "--quiet"])
    assert "not a run directory" in _one_line_error(capsys, code)
    assert (victim / "precious.txt").read_text() == "keep" and len(list(victim.iterdir())) == 1


@pytest.mark.parametrize("where", ["root", "home", "cwd", "ancestor"])
def test_force_refuses_root_home_cwd_and_ancestors(tmp_path, monkeypatch, where):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (tmp_path / MARKER).write_text("{}")  # even a marked ancestor is refused
    (tmp_path / "a" / MARKER).write_text("{}")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "a"))
    out = {"root": "/", "home": str(tmp_path / "a"), "cwd": ".", "ancestor": str(tmp_path)}[where]
    recipe = load_recipe(TINY)
    with pytest.raises(ConfigError, match=r"refuses|not a run directory"):
        Runner(recipe, out, force=True, progress=False).run()
    assert work.is_dir() and (tmp_path / MARKER).is_file()


def test_force_refuses_a_run_directory_holding_foreign_files_and_replaces_a_clean_one(
    finished_run, tmp_path, capsys
):
    recipe, _ = finished_run
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(run), "--quiet", "--stages", "finetune"]) == 0
    assert (run / MARKER).is_file()
    (run / "notes.txt").write_text("mine")
    code = main(["run", str(recipe), "--out", str(run), "--force", "--quiet", "--stages", "finetune"])
    assert "did not write (notes.txt)" in _one_line_error(capsys, code)
    (run / "notes.txt").unlink()
    (run / "1_finetune" / "sentinel").write_text("old")
    assert main(["run", str(recipe), "--out", str(run), "--force", "--quiet", "--stages", "finetune"]) == 0
    assert not (run / "1_finetune" / "sentinel").exists() and (run / "1_finetune" / "manifest.json").is_file()


def test_recipe_name_must_be_a_plain_identifier(tmp_path, capsys):
    for bad in ("../sibling", "a/b", "..", "/abs", ""):
        code = main(["validate", str(_write(tmp_path, {**TINY, "name": bad}))])
        assert "name" in _one_line_error(capsys, code)


def test_out_that_is_a_file_and_stages_without_inputs_are_refused_before_writing(tmp_path, capsys):
    recipe = _write(tmp_path)
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in _one_line_error(capsys, main(["run", str(recipe), "--out", str(f), "--quiet"]))
    fresh = tmp_path / "fresh"
    code = main(["run", str(recipe), "--out", str(fresh), "--stages", "prune", "--quiet"])
    assert "reads the outputs of 'finetune'" in _one_line_error(capsys, code)
    assert not fresh.exists()
    code = main(["run", str(recipe), "--out", str(fresh), "--device", "banana", "--quiet"])
    assert "banana" in _one_line_error(capsys, code) and not fresh.exists()
    code = main(["run", str(recipe), "--out", str(fresh), "--stages", "prune,bogus"])
    assert "bogus" in _one_line_error(capsys, code)


# ----- resume -----
def test_resume_after_a_recipe_change_reruns_the_changed_stages_and_sets_stale_work_aside(
    finished_run, tmp_path, capsys
):
    recipe, _ = finished_run
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(run), "--quiet"]) == 0
    old_model = torch.load(run / "1_finetune" / "model.pt", weights_only=True)["state_dict"]
    args = ["run", str(recipe), "--out", str(run), "--resume", "--stages", "finetune"]
    assert main([*args, "--set", "finetune.lr=0.001", "--set", "finetune.epochs=3"]) == 0
    new_model = torch.load(run / "1_finetune" / "model.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(v, new_model[k]) for k, v in old_model.items())
    assert (run / ".stale" / "1_finetune-1" / "train" / "checkpoints" / "last.pt").is_file()
    manifest = json.loads((run / "1_finetune" / "manifest.json").read_text())
    assert len(manifest["info"]["history"]) == 3
    capsys.readouterr()
    # a new pruning target: prune and everything after it run again, no traceback
    code = main(["run", str(recipe), "--out", str(run), "--resume", "--set", "prune.macs_reduction=2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "[finetune] finished earlier" not in out  # finetune changed back to the recipe's lr
    assert "[prune] done" in out and "[recover] done" in out
    pruned = json.loads((run / "3_prune" / "prune.json").read_text())
    assert pruned["macs_reduction"] >= 2.0 * 0.97


def test_corrupt_manifest_and_killed_export_temp_files_are_handled_on_resume(finished_run, tmp_path, capsys):
    recipe, _ = finished_run
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(run), "--quiet"]) == 0
    (run / "5_export" / "manifest.json").write_text("{not json")
    tmp = run / "5_export" / ".model.onnx.abc123.tmp"
    tmp.write_bytes(b"half an onnx file")
    assert main(["run", str(recipe), "--out", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "[prune] finished earlier" in out and "[export] its manifest is unreadable" in out
    assert not tmp.exists()


def test_report_command_writes_the_report_again(finished_run, capsys):
    """``prune-recipe report RUN`` rewrites the report of a finished run (e.g. after an upgrade),
    and leaves every other stage as it was."""
    recipe, run = finished_run
    page = run / "8_report" / "report.html"
    page.write_text("<html>an old report</html>")  # a report from another version, say
    trained = (run / "1_finetune" / "manifest.json").read_text()
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "report:" in out and "<table>" in page.read_text() and "an old report" not in page.read_text()
    assert (run / "1_finetune" / "manifest.json").read_text() == trained
    # the rewritten report is a finished stage like any other
    assert main(["run", str(recipe), "--out", str(run), "--resume"]) == 0
    assert "[report] finished earlier" in capsys.readouterr().out


def test_report_on_a_broken_run_is_one_line(tmp_path, capsys):
    assert "not a run directory" in _one_line_error(capsys, main(["report", str(tmp_path)]))
    (tmp_path / MARKER).write_text("{}")
    (tmp_path / "recipe.resolved.json").write_text(json.dumps(load_recipe(TINY).model_dump(mode="json")))
    assert "has not finished" in _one_line_error(capsys, main(["report", str(tmp_path)]))


# ----- artefacts -----
def test_flipped_bytes_in_a_pruned_model_are_caught_by_load_and_export(finished_run, tmp_path, capsys):
    _, run = finished_run
    src = run / "3_prune" / "pruned.pt"
    data = bytearray(src.read_bytes())
    # flip 64 bytes inside the largest tensor's storage (the zip container still opens)
    start = len(data) // 2
    for i in range(start, start + 64):
        data[i] ^= 0xFF
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"checksum|cannot be read"):
        load_pruned(bad)
    code = main(["export", str(bad), str(tmp_path / "bad.onnx")])
    _one_line_error(capsys, code)
    assert not (tmp_path / "bad.onnx").exists()


def test_export_never_overwrites_its_input(finished_run, tmp_path, capsys):
    _, run = finished_run
    same = tmp_path / "same.pt"
    same.write_bytes((run / "3_prune" / "pruned.pt").read_bytes())
    before = same.read_bytes()
    assert "input file" in _one_line_error(capsys, main(["export", str(same), str(same)]))
    assert same.read_bytes() == before
    code = main(["export", str(same), str(tmp_path / "m.onnx"), "--opset", "99"])
    assert "opset" in _one_line_error(capsys, code)
    assert main(["export", str(same), str(tmp_path / "m.onnx")]) == 0


def test_pickle_payloads_and_truncated_files_are_refused_without_running_anything(
    finished_run, tmp_path, capsys
):
    _, run = finished_run
    flag = tmp_path / "executed"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"x": Payload(flag)}, f)
    evil_zip = tmp_path / "evil_zip.pt"
    torch.save({"x": Payload(flag)}, evil_zip)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes((run / "3_prune" / "pruned.pt").read_bytes()[:1000])
    for f in (evil, evil_zip, truncated):
        with pytest.raises(DataError) as err:
            load_pruned(f)
        assert "weights_only=False" not in str(err.value)
        line = _one_line_error(capsys, main(["export", str(f), str(tmp_path / "o.onnx")]))
        assert "weights_only=False" not in line
    assert not flag.exists()


def test_bench_refuses_bad_files_and_arguments(finished_run, tmp_path, capsys):
    _, run = finished_run
    garbage = tmp_path / "g.onnx"
    garbage.write_bytes(b"\x00garbage" * 10)
    _one_line_error(capsys, main(["bench", str(garbage)]))
    truncated = tmp_path / "t.onnx"
    truncated.write_bytes((run / "5_export" / "model.onnx").read_bytes()[:500])
    _one_line_error(capsys, main(["bench", str(truncated)]))
    good = str(run / "5_export" / "model.onnx")
    for sizes in ("a", "0", "-4", "1,,2"):
        _one_line_error(capsys, main(["bench", good, f"--batch-sizes={sizes}"]))
    _one_line_error(capsys, main(["bench", good, "--threads", "-1"]))
    assert main(["bench", good, "--batch-sizes", "1", "--repeats", "2", "--threads", "1"]) == 0


# ----- validate resolves names and bounds numbers -----
@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.name=nonet", "unknown model"),
        ("prune.criterion=l7", "unknown criterion"),
        ("icnn.layers=[layer9]", "icnn.layers"),
        ("prune.ignored_layers=[fc2]", "prune.ignored_layers"),
        ("model.weights=missing/w.pt", "does not exist"),
        ("data.image_size=100000", "data.image_size"),
        ("prune.macs_reduction=.inf", "prune.macs_reduction"),
        ("finetune.lr=1e9", "finetune.lr"),
        ("icnn.weight=nan", "icnn.weight"),
        ("finetune.epochs=100000000", "finetune.epochs"),
        ("data.train_size=8", "no full batch"),
        ("measure.threads=-1", "measure.threads"),
    ],
)
def test_validate_resolves_every_name_and_bounds_every_number(tmp_path, capsys, override, needle):
    recipe = _write(tmp_path)
    line = _one_line_error(capsys, main(["validate", str(recipe), "--set", override]))
    assert needle in line
    if override.startswith(("data.image", "prune.macs", "finetune.lr", "icnn.w", "finetune.e", "measure")):
        key = override.split("=", 1)[0]  # the value came from --set, not the file: that option is named
        assert line.startswith(f"prune-recipe: error: --set {key}: "), line


def test_unreadable_recipes_are_one_line(tmp_path, capsys):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01name: x\n")
    assert "UTF-8" in _one_line_error(capsys, main(["validate", str(binary)]))
    bomb = tmp_path / "bomb.yaml"
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb.write_text("\n".join(lines) + "\n")
    assert "expands to more than" in _one_line_error(capsys, main(["validate", str(bomb)]))
    lists = tmp_path / "list.yaml"
    lists.write_text("- 1\n- 2\n")
    assert "mapping" in _one_line_error(capsys, main(["validate", str(lists)]))


def test_the_prune_key_follows_what_decides_the_classifier_refit(tmp_path):
    # prune.refit_classifier: null refits only when recover.epochs is 0: a resume after changing
    # recover.epochs must prune again, one after changing another recover key must not
    def key(**recover):
        recipe = load_recipe({**TINY, "recover": {**TINY["recover"], **recover}})
        return Runner(recipe, tmp_path / "run", progress=False).stage_key("prune")

    assert key(epochs=0) != key(epochs=1)
    assert key(epochs=1, lr=0.001) == key(epochs=1)
