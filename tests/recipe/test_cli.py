"""prune-recipe end to end on a tiny recipe; resume, lock, and invalid recipes."""

import json
import re
from pathlib import Path

import onnx
import pytest
import torch
import yaml
from filelock import FileLock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import icnn_compress as ic
from icnn_compress import ConfigError, Trainer
from icnn_compress.cli import main
from icnn_compress.export import read_metadata
from icnn_compress.recipe import MARKER, RunContext, Runner, load_recipe

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "name": "tiny",
    "data": {
        "name": "synthetic-parts",
        "num_classes": 3,
        "image_size": 16,
        "train_size": 96,
        "val_size": 48,
        "batch_size": 32,
    },
    "model": {"name": "resnet_cifar8", "in_channels": 3},
    "icnn": {"layers": ["layer3"], "warmup_steps": 2},
    "finetune": {"epochs": 2, "lr": 0.05},
    "analysis": {"probe_images": 32, "pictures": False},
    "prune": {"criterion": "l1", "macs_reduction": 1.5, "round_to": None, "step_ratio": 0.1, "bn_batches": 2},
    "recover": {"epochs": 1},
    # the tiny model is barely trained: its INT8 copy agrees with it on 90-96% of the images
    "quantize": {"min_agreement": 0.5, "calibration_batches": 2},
    "measure": {"batch_sizes": [1, 4], "threads": 1, "provider": "cpu", "repeats": 2},
}


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _weights(run):
    return torch.load(run / "4_recover" / "recovered.pt", weights_only=True)["state_dict"]


def test_run_end_to_end_and_resume(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(run), "--quiet"]) == 0
    assert "report:" in capsys.readouterr().out
    for stage in (
        "1_finetune",
        "2_analyse",
        "3_prune",
        "4_recover",
        "5_export",
        "6_quantize",
        "7_measure",
        "8_report",
    ):
        assert (run / stage / "manifest.json").is_file()
    html = (run / "8_report" / "report.html").read_text()
    assert "<table>" in html and "pruned" in html
    # the removed filters of the analysed layer, each with the kept filters that absorbed it
    assert "Removed filters and the kept filters that absorbed them" in html and "layer3</td>" in html
    # synthetic parts have landmarks: the analysed layer's localisation, on the scale of ideal detectors
    analysed = json.loads((run / "2_analyse" / "analysis.json").read_text())["layer3"]
    # (on 16 px images and 4x4 maps a fixed position can score as well as a part detector)
    assert analysed["location_instability_floor"] > 0 and analysed["location_instability_fixed"] > 0
    assert analysed["location_instability"] > 0 and 0 <= analysed["part_interpretability"] <= 1
    assert analysed["ari"] is not None
    assert "Interpretability of the analysed layers" in html
    assert f"{analysed['location_instability']:.4f}</td>" in html
    measured = json.loads((run / "7_measure" / "measurements.json").read_text())
    assert measured[1]["macs"] * 1.5 <= measured[0]["macs"]
    # refit_classifier: null refits the classifier only where no recovery follows
    assert json.loads((run / "3_prune" / "prune.json").read_text())["classifier_refit"] is False
    # the INT8 copy of the pruned model is measured beside the two float models
    assert [(m["name"], m["precision"]) for m in measured] == [
        ("unpruned", "fp32"),
        ("pruned", "fp32"),
        ("pruned-int8", "int8"),
    ]
    quantized = json.loads((run / "6_quantize" / "quantize.json").read_text())
    assert quantized["accepted"] and quantized["top1_agreement"] >= 0.5
    assert measured[2]["top1_agreement_with_fp32"] == quantized["top1_agreement"]
    assert measured[2]["kept_float"] == quantized["kept_float"] and isinstance(quantized["precision"], dict)
    md = (run / "8_report" / "report.md").read_text()
    n = len(quantized["kept_float"])  # the quantize stage timed this machine: some convs may stay float
    assert "pruned-int8" in html and f"| pruned-int8 | int8{f' ({n} convs fp32)' if n else ''} |" in md
    # every key the report writes is documented in docs/report.md
    documented = set(re.findall(r"`([a-z_0-9<>N]+)`", (ROOT / "docs" / "report.md").read_text()))
    report = json.loads((run / "8_report" / "report.json").read_text())
    keys = (
        set(report)
        | {k for m in report["models"] for k in m}
        | {k for r in report["removed_filters"] for k in r}
        | {k for r in report["interpretability"] for k in r}
    )
    keys |= {k for m in report["models"] for lat in m["latency"].values() for k in lat}
    keys = {re.sub(r"^speedup_b\d+$", "speedup_b<N>", k) for k in keys}
    assert report["removed_filters"] and not keys - documented, sorted(keys - documented)
    # an existing run directory is never overwritten without --force
    assert main(["run", str(recipe), "--out", str(run), "--quiet"]) == 2
    # --resume skips every finished stage; a corrupted artefact makes its stage (and later ones) run again
    before = _weights(run)
    (run / "5_export" / "model.onnx").write_bytes(b"corrupt")
    assert main(["run", str(recipe), "--out", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "[prune] finished earlier" in out and "[export] checksum mismatch" in out
    # the export is written again byte for byte, so the INT8 copy made from it is still valid
    assert "[quantize] finished earlier" in out
    assert all(torch.equal(v, _weights(run)[k]) for k, v in before.items())


def test_kill_inside_a_stage_then_resume_reproduces(recipe, tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert main(["run", str(recipe), "--out", str(full), "--quiet", "--stages", "finetune"]) == 0
    calls = {"n": 0}
    original = Trainer.train_epoch

    def interrupted(self, epoch):
        calls["n"] += 1
        if calls["n"] == 2:  # the second epoch of the fine-tune: epoch 1's checkpoint exists
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    part = tmp_path / "part"
    assert main(["run", str(recipe), "--out", str(part), "--quiet", "--stages", "finetune"]) == 130
    assert not (part / "1_finetune" / "manifest.json").exists()
    FileLock(str(part / ".lock"), timeout=0).acquire().lock.release()  # the lock was released
    monkeypatch.setattr(Trainer, "train_epoch", original)
    assert main(["run", str(recipe), "--out", str(part), "--quiet", "--resume", "--stages", "finetune"]) == 0
    a = torch.load(full / "1_finetune" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(part / "1_finetune" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_lock_conflict_is_refused(recipe, tmp_path, capsys):
    run = tmp_path / "locked"
    run.mkdir()
    (run / MARKER).write_text("{}")
    with FileLock(str(run / ".lock"), timeout=0):  # another run holds it
        assert main(["run", str(recipe), "--out", str(run), "--resume", "--quiet"]) == 3
    assert "in use by another run" in capsys.readouterr().err


def test_validate_show_list(recipe, capsys):
    assert main(["validate", str(recipe)]) == 0 and capsys.readouterr().out.strip() == "ok"
    assert main(["show", str(recipe), "--set", "prune.macs_reduction=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["prune"]["macs_reduction"] == 3 and shown["finetune"]["optimizer"] == "sgd"
    assert main(["list"]) == 0 and "quickstart" in capsys.readouterr().out
    # show resolves names as validate does: a misspelt criterion is the error, not a printed recipe
    assert main(["show", str(recipe), "--set", "prune.criterion=l7"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "prune.criterion: unknown criterion 'l7'; available:" in captured.err


@pytest.mark.parametrize(("sets", "match"), [
    (["prune.criterion=fisher", "prune.criterion_options.bogus=1"],
     "prune.criterion_options: criterion 'fisher' has no option 'bogus'; its options: probe_batches"),
    (["prune.criterion=fisher", "prune.criterion_options.ridge=-1"],
     "prune.criterion_options: criterion 'fisher': ridge must be a number > 0. Got -1."),
    (["prune.criterion=icnn-cluster", "prune.criterion_options.distance_threshold=0.3"],
     "prune.criterion_options: set icnn-cluster's distance_threshold as analysis.distance_threshold"),
])  # fmt: skip
def test_criterion_options_are_checked_before_a_run(recipe, tmp_path, capsys, sets, match):
    args = [x for kv in sets for x in ("--set", kv)]
    assert main(["validate", str(recipe), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err, err
    out = tmp_path / "never"
    assert main(["run", str(recipe), "--out", str(out), "--quiet", *args]) == 2
    assert not out.exists()  # refused before anything was written


def test_criterion_options_reach_the_recipes_criterion_only():
    from icnn_compress.recipe._stages import _criterion_options

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides=[
        "prune.criterion=fisher", "prune.criterion_options.residual=false",
    ])  # fmt: skip
    ctx = RunContext(recipe)
    assert _criterion_options(ctx, "fisher") == {"residual": False}
    assert _criterion_options(ctx, "icnn-cluster") == {"distance_threshold": 0.25}  # a compared one
    assert _criterion_options(ctx, "l2") == {}


@pytest.mark.parametrize(("mutation", "match"), [
    ({"prune": {"macs_reduction": 0.5}}, r"tiny.yaml:\d+: prune.macs_reduction: Input should be greater"),
    ({"finetune": {"optimizr": "sgd"}}, r"unknown key 'finetune.optimizr'. Did you mean 'finetune.optim"),
    ({"data": {"name": "mnist"}}, r"data.name: Input should be 'synthetic-parts', 'fashion-mnist'"),
    # a union type: the line names every member's rule, and the key without pydantic's member tags
    ({"quantize": {"reduce_range": "maybe"}},
     r"tiny.yaml:\d+: quantize.reduce_range: Input should be 'auto', or input should be a valid boolean"),
    ({"quantize": {"keep_float": 7}},
     r"tiny.yaml:\d+: quantize.keep_float: Input should be 'auto' or 'none', or input should be a valid li"),
])  # fmt: skip
def test_invalid_recipes_name_key_line_and_allowed(tmp_path, capsys, mutation, match):
    data = json.loads(json.dumps(TINY))
    for section, values in mutation.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    import re

    assert re.search(match, err), err


def test_yaml_syntax_error_and_bad_set(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  name: [unclosed\n")
    assert main(["validate", str(path)]) == 2
    assert "YAML syntax error" in capsys.readouterr().err
    assert main(["validate", "quickstart", "--set", "noequals"]) == 2


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # a misspelt key inside a section gets the same suggestion as in a file
        (
            "prune.macs_reductio=3",
            "--set prune.macs_reductio: unknown key 'prune.macs_reductio'. "
            "Did you mean 'prune.macs_reduction'? Allowed here: criterion, ",
        ),
        ("prun.macs_reduction=3", "--set prun.macs_reduction: unknown key 'prun'. Did you mean 'prune'?"),
    ],
)
def test_misspelt_set_key_gets_a_suggestion(capsys, override, expected):
    assert main(["validate", "quickstart", "--set", override]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err, err


_keys = st.sampled_from(["data", "model", "icnn", "finetune", "prune", "recover", "measure", "bogus"])
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=_keys, key=st.text(min_size=1, max_size=12), value=_values)
def test_mutated_recipes_give_one_line_errors(tmp_path, capsys, section, key, value):
    data = json.loads(json.dumps(TINY))
    target = data.setdefault(section, {})
    if isinstance(target, dict):
        keys = list(target) or [key]
        target[keys[hash(key) % len(keys)] if key.isidentifier() else key] = value
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code in (0, 2)
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("prune-recipe: error:")
        assert "Traceback" not in err
    else:
        load_recipe(path)  # valid mutations really are valid


def test_compare_prunes_the_same_finetuned_model_with_each_criterion(recipe, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(recipe), "--criteria", "l1,icnn-cluster", "--out", str(out), "--quiet"]) == 0
    rows = json.loads((out / "compare" / "compare.json").read_text())
    # the unpruned float model, then each criterion's pruned model in float and in INT8
    assert [(r["criterion"], r["precision"]) for r in rows] == [
        ("unpruned", "fp32"),
        ("l1", "fp32"),
        ("l1", "int8"),
        ("icnn-cluster", "fp32"),
        ("icnn-cluster", "int8"),
    ]
    assert rows[0]["macs_reduction"] == 1.0
    pruned = [r for r in rows[1:] if "refused" not in r]
    assert all(r["macs_reduction"] >= 1.5 * 0.97 and 0 <= r["accuracy"] <= 1 for r in pruned)
    assert "icnn-cluster" in capsys.readouterr().out
    code = main(["compare", str(recipe), "--criteria", "l1,nope", "--out", str(out)])
    assert code == 2 and "unknown criteria" in capsys.readouterr().err


def test_unmask_epochs_train_the_last_epochs_without_masks(tmp_path):
    from icnn_compress.icnn import ICNNMask
    from icnn_compress.prune import load_pruned
    from icnn_compress.recipe import Runner

    data = json.loads(json.dumps(TINY))
    data["icnn"]["unmask_epochs"] = 1
    run = tmp_path / "u"
    runner = Runner(load_recipe(data), run, stages=["finetune", "prune", "recover"], progress=False)
    runner.run()
    manifest = json.loads((run / "1_finetune" / "manifest.json").read_text())
    assert len(manifest["info"]["history"]) == 2 and (run / "1_finetune" / "train_unmasked").is_dir()
    model, _ = runner.finetuned_model()
    masks = [m for m in model.modules() if isinstance(m, ICNNMask)]
    assert masks and not any(m.enabled for m in masks)
    pruned, _ = load_pruned(run / "4_recover" / "recovered.pt")
    assert not any(m.enabled for m in pruned.modules() if isinstance(m, ICNNMask))
    data["icnn"]["unmask_epochs"] = 3
    with pytest.raises(ConfigError, match="unmask_epochs"):
        Runner(load_recipe(data), tmp_path / "bad", progress=False).check()


def test_keep_classes_specialises_the_run(tmp_path):
    from icnn_compress.prune import load_pruned
    from icnn_compress.recipe import Runner

    data = json.loads(json.dumps(TINY))
    data["prune"]["keep_classes"] = [2, 0]
    data["quantize"]["enabled"] = False
    run = tmp_path / "k"
    Runner(load_recipe(data), run, progress=False).run()
    pruned, _ = load_pruned(run / "4_recover" / "recovered.pt")
    assert pruned.fc.out_features == 2
    measured = json.loads((run / "7_measure" / "measurements.json").read_text())
    # both models are measured on the kept classes only, the unpruned one through its kept outputs
    assert [len(m["per_class_accuracy"]) for m in measured] == [2, 2]
    assert json.loads((run / "3_prune" / "prune.json").read_text())["keep_classes"] == [0, 2]
    assert json.loads((run / "6_quantize" / "quantize.json").read_text()) == {"enabled": False}
    assert "Accuracy per class" in (run / "8_report" / "report.html").read_text()
    data["prune"]["keep_classes"] = [0, 3]
    with pytest.raises(ConfigError, match=r"prune\.keep_classes"):
        Runner(load_recipe(data), tmp_path / "bad", progress=False).check()
    data["prune"]["keep_classes"] = [1]
    with pytest.raises(ConfigError, match="keep_classes"):
        load_recipe(data)


def test_version_and_fast_help():
    import subprocess
    import sys
    import time
    from pathlib import Path

    exe = Path(sys.executable).parent / "prune-recipe"
    done = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    from icnn_compress import __version__

    assert done.returncode == 0 and done.stdout.strip() == f"prune-recipe {__version__}"
    best = float("inf")
    for _ in range(3):  # --help must not import torch: well under a second on an idle machine
        t0 = time.perf_counter()
        done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
        best = min(best, time.perf_counter() - t0)
        assert done.returncode == 0 and "run" in done.stdout
    assert best < 2.0, f"prune-recipe --help took {best:.2f} s"
    probe = "import sys, icnn_compress, icnn_compress.cli; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
        == "False"
    )


def test_target_threshold_and_step_schedule_keys_reach_what_they_name(monkeypatch, tmp_path):
    """prune.params_reduction / latency_speedup become the Target, analysis.distance_threshold
    reaches icnn-cluster, finetune.step_epochs/gamma reach the Trainer."""
    import icnn_compress.prune as prune_api
    from icnn_compress.recipe import RunContext, stages

    seen = {}
    monkeypatch.setattr(prune_api, "prune_model", lambda *a, **k: seen.update(k))
    data = json.loads(json.dumps(TINY))
    data["prune"].update(criterion="icnn-cluster", params_reduction=1.7, macs_reduction=None)
    data["analysis"]["distance_threshold"] = 0.4
    with pytest.raises(ConfigError, match=r"--set prune\.macs_reduction.*one target"):
        load_recipe(data, ["prune.macs_reduction=2"])
    ctx = RunContext(load_recipe(data), progress=False)
    stages.prune_with(ctx, torch.nn.Linear(1, 1))
    assert seen["target"].kind == "params_reduction" and seen["target"].value == 1.7
    assert seen["criterion_options"] == {"distance_threshold": 0.4}
    data["prune"].update(params_reduction=None, latency_speedup=1.3, latency_batch=8)
    stages.prune_with(RunContext(load_recipe(data), progress=False), torch.nn.Linear(1, 1))
    assert seen["target"].kind == "latency_speedup" and seen["target"].latency_batch == 8

    captured = {}

    class Spy(Trainer):
        def __init__(self, *a, **k):
            captured.update(k)
            super().__init__(*a, **k)

    monkeypatch.setattr("icnn_compress.recipe._stages.ic.Trainer", Spy)
    data["finetune"].update(schedule="step", step_epochs=1, gamma=0.5, epochs=1)
    data["icnn"]["enabled"] = False
    from icnn_compress.recipe import Runner

    Runner(load_recipe(data), tmp_path / "s", stages=["finetune"], progress=False).run()
    assert captured["schedule"] == "step" and captured["step_epochs"] == 1 and captured["gamma"] == 0.5


def test_json_output_verbosity_and_log_file(recipe, tmp_path, capsys):
    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert any(r["name"] == "quickstart" and r["path"].endswith("quickstart.yaml") for r in listed)
    assert main(["show", str(recipe), "--json", "--set", "seed=3"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 3
    log = tmp_path / "run.log"
    run = tmp_path / "r"
    args = ["run", str(recipe), "--out", str(run), "--stages", "finetune"]
    assert main(["-q", "--log-file", str(log), *args]) == 0
    out = capsys.readouterr().out
    assert "[finetune]" not in out and "run finished" in out  # -q: no stage lines, the result stays
    assert "[finetune]" in log.read_text()  # the log file has every message, with timestamps
    assert main(["-v", *args, "--resume"]) == 0
    assert "[finetune] finished earlier" in capsys.readouterr().out


def test_a_refused_int8_model_is_reported_not_kept(tmp_path, monkeypatch):
    from icnn_compress.quantize import _int8

    # whether the tiny model's INT8 copy changes any prediction depends on the ONNX Runtime
    # version; the guard itself is tested on a model built to disagree (tests/quantize). Here the
    # measured agreement is halved, so that the run must take the refusal path.
    measured_agreement = _int8._agreement

    def halved(*args, **kwargs):
        agreement, *rest = measured_agreement(*args, **kwargs)
        return (agreement / 2, *rest)

    monkeypatch.setattr(_int8, "_agreement", halved)
    data = json.loads(json.dumps(TINY))
    data["quantize"]["min_agreement"] = 0.6
    data["quantize"]["keep_float"] = "none"
    run = tmp_path / "q"
    Runner(load_recipe(data), run, progress=False).run()
    quantized = json.loads((run / "6_quantize" / "quantize.json").read_text())
    assert not quantized["accepted"] and quantized["top1_agreement"] < 1.0
    assert not (run / "6_quantize" / "model.int8.onnx").exists()
    measured = json.loads((run / "7_measure" / "measurements.json").read_text())
    assert [m["name"] for m in measured] == ["unpruned", "pruned"]
    assert "below min_agreement 0.6" in measured[1]["int8_refused"]
    report = json.loads((run / "8_report" / "report.json").read_text())
    assert "No INT8 copy: top-1 agreement" in report["models"][1]["warning"]


def test_quantize_command_writes_a_guarded_int8_copy(recipe, tmp_path, capsys):
    from icnn_compress import models
    from icnn_compress.export import export_onnx

    src = tmp_path / "m.onnx"
    export_onnx(
        models.create("resnet_cifar8", num_classes=3, in_channels=3).eval(), src, torch.rand(1, 3, 16, 16)
    )
    out = tmp_path / "m.int8.onnx"
    args = ["quantize", str(src), str(out), "--recipe", str(recipe), "--min-agreement", "0", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accepted"] and result["path"] == str(out) and out.is_file()
    assert (
        result["options"]["min_agreement"] == 0 and result["options"]["calibration_batches"] == 2
    )  # recipe's
    assert main(["quantize", str(src), str(src), "--recipe", str(recipe)]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert (
        main(
            ["quantize", str(src), str(tmp_path / "x.onnx"), "--recipe", str(recipe), "--min-agreement", "2"]
        )
        == 2
    )
    assert "min_agreement must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    # --keep-float: the recipe's "auto" timed the model here; named nodes stay float; bad names: one line
    assert result["options"]["keep_float"] == "auto" and result["precision"]["fp32_ms"] > 0
    # timed as the recipe measures: its largest batch size and its threads
    assert (result["precision"]["batch"], result["precision"]["threads"]) == (4, 1)
    first = next(n.name for n in onnx.load(str(src)).graph.node if n.op_type == "Conv")
    bad = ["quantize", str(src), str(tmp_path / "x.onnx"), "--recipe", str(recipe), "--keep-float", "nope"]
    assert main(bad) == 2
    assert "keep_float: no Conv node 'nope' in m.onnx" in capsys.readouterr().err
    named = [
        "quantize",
        str(src),
        str(out),
        "--recipe",
        str(recipe),
        "--min-agreement",
        "0",
        "--keep-float",
        first,
    ]
    assert main(named) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads(read_metadata(out)["quantization"])["kept_float"] == [first]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (dict(macs_reduction=None, params_reduction=2.0), "params_reduction"),
        (dict(keep_classes=[0, 1]), "keep_classes"),
    ],
)
def test_latency_allocation_is_checked_when_the_recipe_is_read(extra, match):
    data = json.loads(json.dumps(TINY))
    data["prune"].update(allocation="latency", **extra)
    with pytest.raises(ConfigError, match=rf"prune.*allocation 'latency'.*{match}"):
        load_recipe(data)
    data["prune"]["allocation"] = "fastest"
    with pytest.raises(ConfigError, match=r"prune\.allocation"):
        load_recipe(data)


@pytest.mark.parametrize(
    ("refit", "recover_epochs", "expected"), [(None, 0, True), (False, 0, False), (True, 1, True)]
)
def test_the_prune_stage_refits_the_classifier_as_the_recipe_says(tmp_path, refit, recover_epochs, expected):
    recipe = tmp_path / "tiny.yaml"
    # 320 training images: enough probe rows (8 batches of 32) for the classifier's 64 features
    data = {**TINY["data"], "train_size": 320}
    prune = {**TINY["prune"], "refit_classifier": refit, "bn_batches": 10}
    recipe.write_text(
        yaml.safe_dump({**TINY, "data": data, "prune": prune, "recover": {"epochs": recover_epochs}})
    )
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(run), "--quiet", "--stages", "finetune,prune"]) == 0
    assert json.loads((run / "3_prune" / "prune.json").read_text())["classifier_refit"] is expected


@pytest.mark.parametrize(
    "section,key", [("recover", {"epochs": 1, "teacher": "base"}), ("prune", {"refit_teacher": "base"})]
)
def test_a_base_teacher_without_weights_is_refused_in_one_line(tmp_path, capsys, section, key):
    recipe = tmp_path / "tiny.yaml"
    data = {**TINY, "recover": {"epochs": 0}}
    data[section] = {**data[section], **key}
    recipe.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(run), "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    name = "recover.teacher" if section == "recover" else "prune.refit_teacher"
    assert len(err) == 1 and name in err[0] and "model.weights" in err[0]
    assert not run.exists()  # refused before anything was written


def _teacher_spy(tmp_path, monkeypatch, module, name: str, position: int, loss: bool):
    """A tiny recipe that starts from saved base weights (with or without the filter loss), and a
    check of whether the last call of ``module.name`` got the base model as its positional
    argument ``position`` (the teacher)."""
    torch.manual_seed(0)
    base = ic.models.create("resnet_cifar8", num_classes=3, in_channels=3)
    weights = tmp_path / "base.pt"
    torch.save(base.state_dict(), weights)
    seen = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(args[position])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    data = {**TINY, "model": {**TINY["model"], "weights": str(weights)}}
    data["icnn"] = {**TINY["icnn"], "enabled": loss}

    def taught_by_base() -> bool:
        used = seen[-1].state_dict()  # the last call is the stage under test
        return all(torch.equal(used[k], v) for k, v in base.state_dict().items() if k in used)

    return data, taught_by_base


@pytest.mark.parametrize(
    "teacher,loss,expected",
    [
        ("finetuned", True, "finetuned"),
        ("base", True, "base"),
        ("auto", True, "base"),  # the fine-tune used the filter loss: the base model teaches
        ("auto", False, "finetuned"),  # a plain fine-tune: the fine-tuned model teaches
    ],
)
def test_recovery_distils_from_the_teacher_the_recipe_names(tmp_path, monkeypatch, teacher, loss, expected):
    from icnn_compress.recipe import _stages

    data, taught_by_base = _teacher_spy(tmp_path, monkeypatch, _stages, "_distill", 0, loss)
    data["recover"] = {"epochs": 1, "teacher": teacher}
    run = tmp_path / "run"
    Runner(load_recipe(data), run, stages=["finetune", "prune", "recover"], progress=False).run()
    assert taught_by_base() is (expected == "base")
    assert json.loads((run / "4_recover" / "manifest.json").read_text())["info"]["teacher"] == expected


@pytest.mark.parametrize(
    "refit_teacher,loss,expected",
    [("finetuned", True, "finetuned"), ("auto", True, "base"), ("auto", False, "finetuned")],
)
def test_the_one_shot_refit_fits_the_teacher_the_recipe_names(
    tmp_path, monkeypatch, refit_teacher, loss, expected
):
    from icnn_compress.prune import _refit

    data, taught_by_base = _teacher_spy(tmp_path, monkeypatch, _refit, "refit_classifier", 1, loss)
    data["recover"] = {"epochs": 0}
    data["prune"] = {**TINY["prune"], "refit_teacher": refit_teacher}
    data["data"] = {**TINY["data"], "train_size": 192}  # enough probe rows for the refit
    run = tmp_path / "run"
    Runner(load_recipe(data), run, stages=["finetune", "prune"], progress=False).run()
    assert taught_by_base() is (expected == "base")
    report = json.loads((run / "3_prune" / "prune.json").read_text())
    assert report["classifier_refit"] is True and report["refit_teacher"] == expected


def test_recover_teacher_auto_without_weights_distils_from_the_finetuned_model(tmp_path):
    recipe = load_recipe({**TINY, "recover": {"epochs": 1, "teacher": "auto"}})
    ctx = RunContext(recipe)
    ctx.check()  # not refused: auto falls back to the fine-tuned model
    assert ctx.teacher("recover") == "finetuned" and ctx.teacher("prune") == "finetuned"


def test_a_base_whose_classifier_was_left_at_init_does_not_teach(tmp_path, monkeypatch):
    # e.g. model.weights = a torchvision ImageNet name for a 200-class task: the new head is random
    base = ic.models.create("resnet_cifar8", num_classes=3, in_channels=3)
    weights = tmp_path / "base.pt"
    torch.save(base.state_dict(), weights)
    base.icnn_skipped_weights = ["fc.bias", "fc.weight"]
    monkeypatch.setattr(RunContext, "base_model", lambda self, weights=True: base)
    data = {**TINY, "model": {**TINY["model"], "weights": str(weights)}}
    ctx = RunContext(load_recipe(data))
    assert ctx.teacher("recover") == "finetuned" and ctx.teacher("prune") == "finetuned"
    data["recover"] = {"epochs": 1, "teacher": "base"}
    with pytest.raises(ConfigError, match=r"recover.teacher: 'base', but model.weights .* leaves 2 tensors"):
        RunContext(load_recipe(data)).check()


def test_console_script_exits_quickly_but_completely(tmp_path):
    """console_main skips the interpreter's teardown, yet keeps the exit code, flushes every byte
    written to a pipe and runs the exit handlers (temporary files, logging)."""
    import os
    import subprocess
    import sys

    marker = tmp_path / "atexit-ran"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a user runs it
    code = (
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))\n"
        "sys.stdout.write('x' * 5000)\n"  # left in the buffer: a pipe is block-buffered
        "from icnn_compress.cli import console_main\n"
        "sys.argv = ['prune-recipe', *sys.argv[1:]]\n"
        "console_main()\n"
    )
    bad = subprocess.run(
        [sys.executable, "-c", code, "validate", "no-such-recipe"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and bad.stdout == "x" * 5000 and marker.read_text() == "yes"
    assert bad.stderr.count("\n") == 1 and "no-such-recipe" in bad.stderr
    marker.unlink()
    good = subprocess.run(
        [sys.executable, "-c", code, "show", "quickstart", "--json"], capture_output=True, text=True, env=env
    )
    assert good.returncode == 0 and marker.read_text() == "yes"
    assert json.loads(good.stdout[5000:])["name"] == "quickstart"
