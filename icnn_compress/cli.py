"""The ``prune-recipe`` command: a thin shell over the Python API.

Exit codes: 0 success; 1 the run failed (e.g. training diverged); 2 bad usage, recipe or input
(one line on stderr, no traceback); 3 the run directory is locked by another run; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import NoReturn

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, False)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # usage errors: one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"{value} is out of range (1..100000)")
    return value


def _int_list(text: str, what: str) -> list[int]:
    """``"1,32"`` -> ``[1, 32]``; each an int in 1..4096."""
    items = [t.strip() for t in text.split(",")]
    if not items or any(not t for t in items):
        raise _Usage(f"{what} must be comma-separated integers such as 1,32. Got {text!r}.")
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise _Usage(f"{what} must be comma-separated integers such as 1,32. Got {text!r}.") from None
    bad = [v for v in values if not 1 <= v <= 4096]
    if bad:
        raise _Usage(f"{what}: {bad[0]} is out of range (allowed 1..4096).")
    return values


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="prune-recipe",
        description="Fine-tune with interpretable filters, prune, export and measure, from a YAML recipe.",
        epilog="Exit codes: 0 ok, 1 run failed, 2 bad usage/recipe, 3 run directory locked, 130 interrupted.",
    )
    from icnn_compress._version import __version__

    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v: debug messages)")
    p.add_argument(
        "-q",
        "--quiet",
        dest="log_quiet",
        action="store_true",
        help="only warnings and errors (no stage lines)",
    )
    p.add_argument(
        "--log-file", default=None, metavar="PATH", help="also write every log message (debug level) here"
    )
    p.add_argument(
        "--progress",
        action="store_true",
        help="draw progress bars even when stderr is not a terminal (by default only on a terminal)",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def recipe_args(sp):
        sp.add_argument("recipe", help="recipe file, or a bundled recipe name (see 'list')")
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a key, e.g. --set prune.macs_reduction=3 (repeatable)",
        )

    r = sub.add_parser("run", help="run a recipe's stages into a run directory")
    recipe_args(r)
    r.add_argument("--out", default=None, help="run directory (default runs/<recipe name>)")
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue a run directory: finished stages (same recipe and inputs, checksums verified) "
        "are skipped, an interrupted stage continues from its last checkpoint",
    )
    r.add_argument(
        "--force",
        action="store_true",
        help="replace an existing run directory (only one that prune-recipe wrote; others are refused)",
    )
    r.add_argument(
        "--stages",
        default=None,
        help="comma-separated subset of: finetune, analyse, prune, recover, export, quantize, measure, "
        "report",
    )
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    v = sub.add_parser("validate", help="check a recipe; prints 'ok' or the first error")
    recipe_args(v)
    s = sub.add_parser("show", help="print the fully resolved recipe (YAML, or JSON with --json)")
    recipe_args(s)
    s.add_argument("--json", action="store_true", help="JSON instead of YAML")
    ls = sub.add_parser("list", help="list the bundled recipes")
    ls.add_argument("--json", action="store_true", help="a JSON list of {name, description, path}")
    c = sub.add_parser("compare", help="prune the same fine-tuned model with several criteria; one table")
    recipe_args(c)
    c.add_argument("--criteria", required=True, help="comma-separated, e.g. icnn-cluster,l1,fpgm")
    c.add_argument("--out", default=None, help="run directory (default runs/<recipe name>)")
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    c.add_argument("--quiet", action="store_true", help="no progress output")
    c.add_argument("--json", action="store_true", help="print the table as JSON")
    e = sub.add_parser("export", help="export a pruned model file (save_pruned format) to ONNX")
    e.add_argument("pruned", help="a .pt written by save_pruned (e.g. RUN/4_recover/recovered.pt)")
    e.add_argument("onnx", help="output .onnx")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's, 17)")
    qz = sub.add_parser(
        "quantize",
        help="INT8 copy of an ONNX model, calibrated on a recipe's training data and guarded on its "
        "validation data",
    )
    qz.add_argument("onnx", help="the float .onnx (e.g. RUN/5_export/model.onnx)")
    qz.add_argument("out", help="output .onnx, written only when the guard accepts the INT8 model")
    qz.add_argument(
        "--recipe", required=True, help="recipe whose data calibrates and validates (file or bundled name)"
    )
    qz.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)"
    )
    qz.add_argument(
        "--method",
        default=None,
        choices=["minmax", "entropy", "percentile"],
        help="calibration method (default: the recipe's quantize.method)",
    )
    qz.add_argument("--calibration-batches", type=_positive_int, default=None, help="default: the recipe's")
    qz.add_argument(
        "--min-agreement", type=float, default=None, help="guard threshold 0..1 (default: the recipe's)"
    )
    qz.add_argument(
        "--keep-float",
        default=None,
        metavar="auto|none|NODE,...",
        help="convolutions left in float: 'auto' (timed here), 'none', or Conv node names "
        "(default: the recipe's quantize.keep_float)",
    )
    qz.add_argument("--json", action="store_true", help="print the result as JSON")
    b = sub.add_parser("bench", help="ONNX Runtime latency of an ONNX file")
    b.add_argument("onnx", help="an .onnx file")
    b.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes")
    b.add_argument("--threads", type=_positive_int, default=2, help="intra-op threads")
    b.add_argument(
        "--provider",
        default="auto",
        choices=["auto", "cpu", "cuda", "tensorrt"],
        help="ONNX Runtime execution provider",
    )
    b.add_argument("--repeats", type=_positive_int, default=50, help="timed runs per batch size")
    b.add_argument("--input-shape", default=None, help="C,H,W when the model's input is not static")
    b.add_argument("--json", action="store_true", help="print the latencies as JSON")
    rp = sub.add_parser("report", help="(re)write the report of a run directory")
    rp.add_argument("run_dir", help="a run directory written by 'run'")
    return p


def _stages(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def _cmd_run(a) -> int:
    """Under ``torchrun`` the process group is joined here: every rank trains (DDP), rank 0
    analyses, prunes, exports, measures and writes the run directory; only rank 0 speaks."""
    from icnn_compress import _dist
    from icnn_compress.recipe import Runner, load_recipe

    recipe = load_recipe(a.recipe, a.set)
    out = a.out or f"runs/{recipe.name}"
    joined = _dist.init_from_env(a.device)
    lead = _dist.rank() == 0
    if not lead:  # the other ranks only report warnings and errors of their own
        for handler in logging.getLogger("icnn_compress").handlers:
            handler.setLevel(max(handler.level, logging.WARNING))
    try:
        run_dir = Runner(
            recipe,
            out,
            resume=a.resume,
            force=a.force,
            stages=_stages(a.stages),
            device=_rank_device(a.device) if joined else a.device,
            progress=not a.quiet and lead,
        ).run()
    finally:
        if joined:
            _dist.leave()
    report = Runner.report_file(run_dir)
    if lead:
        print(f"run finished: {run_dir}" + (f"\nreport: {report}" if report.is_file() else ""))
    return EXIT_OK


def _rank_device(device: str | None) -> str | None:
    """Under torchrun on CUDA, each process uses the GPU of its ``LOCAL_RANK``."""
    import os

    import torch

    if device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _cmd_compare(a) -> int:
    from icnn_compress._io import atomic_write_json
    from icnn_compress.export import export_onnx
    from icnn_compress.measure import measure
    from icnn_compress.prune import list_criteria
    from icnn_compress.quantize import quantize_onnx
    from icnn_compress.recipe import Runner, load_recipe, stages

    recipe = load_recipe(a.recipe, a.set)
    criteria = [c.strip() for c in a.criteria.split(",") if c.strip()]
    bad = [c for c in criteria if c not in list_criteria()]
    if bad or not criteria:
        raise _Usage(f"unknown criteria {bad or a.criteria!r}; available: {', '.join(list_criteria())}")
    out = Path(a.out or f"runs/{recipe.name}")
    runner = Runner(recipe, out, resume=True, stages=["finetune"], device=a.device, progress=not a.quiet)
    runner.run()
    ctx = runner.ctx
    base, _ = runner.finetuned_model()
    example = ctx.example().cpu()
    train_dl, val_dl = ctx.kept_loaders()  # a specialising recipe is compared on its kept classes
    q = recipe.quantize
    options = q.options(recipe.measure)

    def row(name: str, precision: str, path: Path, macs_reduction: float) -> dict:
        entry = measure(
            path,
            val_dl,
            name=name,
            batch_sizes=(1,),
            threads=recipe.measure.threads,
            provider="cpu",
            repeats=recipe.measure.repeats,
        )
        return {
            "criterion": name,
            "precision": precision,
            "accuracy": entry["accuracy"],
            "macs_reduction": macs_reduction,
            "latency_b1_ms": entry["latency"]["1"]["median_ms"],
        }

    folder = out / "compare"
    models = [("unpruned", base.eval().cpu(), 1.0)] if recipe.prune.keep_classes is None else []
    for crit in criteria:
        ctx.start_stage("prune")  # every criterion sees the same probe batches
        res = stages.prune_with(ctx, base, crit)
        models.append((crit, res.model.eval().cpu(), res.macs_reduction))
    rows = []
    for name, model, reduction in models:
        path = folder / f"{name}.onnx"
        export_onnx(model, path, example)
        rows.append(row(name, "fp32", path, reduction))
        if q.enabled and name != "unpruned":
            int8 = quantize_onnx(path, folder / f"{name}.int8.onnx", train_dl, val_dl, options)
            if int8.accepted:
                rows.append(row(name, "int8", Path(int8.path), reduction))
            else:
                rows.append({"criterion": name, "precision": "int8", "refused": int8.reason})
    atomic_write_json(rows, folder / "compare.json")
    if a.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    print(f"{'criterion':<16} {'precision':<9} {'accuracy':>9} {'MACs red.':>9} {'b1 ms':>8}")
    for r in rows:
        if "refused" in r:
            print(f"{r['criterion']:<16} {'int8':<9} refused: {r['refused']}")
            continue
        print(
            f"{r['criterion']:<16} {r['precision']:<9} {r['accuracy']:>9.4f} {r['macs_reduction']:>8.2f}x "
            f"{r['latency_b1_ms']:>8.3f}"
        )
    return EXIT_OK


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.exists() and a.samefile(b))
    except OSError:
        return False


def _cmd_export(a) -> int:
    import torch

    from icnn_compress.export import export_onnx
    from icnn_compress.prune import read_pruned_record, rebuild_pruned

    src, dst = Path(a.pruned), Path(a.onnx)
    if _same_file(src, dst):
        raise _Usage(f"the output {a.onnx!r} is the input file; choose another output path")
    if dst.suffix.lower() != ".onnx":
        raise _Usage(f"the output {a.onnx!r} must end in .onnx")
    if dst.is_dir():
        raise _Usage(f"the output {a.onnx!r} is a directory")
    record = read_pruned_record(src)
    model, meta = rebuild_pruned(record), json.loads(record["metadata"])
    example = torch.rand(1, *record["input_shape"], generator=torch.Generator().manual_seed(0))
    res = export_onnx(model.eval(), dst, example, opset=a.opset, metadata={"source": str(src), **meta})
    print(
        f"wrote {res.path} ({res.file_bytes} bytes, opset {res.opset}, "
        f"max |onnx - torch| {res.max_abs_diff:.2e})"
    )
    return EXIT_OK


def _cmd_quantize(a) -> int:
    from icnn_compress.quantize import quantize_onnx
    from icnn_compress.recipe import RunContext, load_recipe

    src, dst = Path(a.onnx), Path(a.out)
    if not src.is_file():
        raise _Usage(f"no ONNX file at {a.onnx!r}")
    if _same_file(src, dst):
        raise _Usage(f"the output {a.out!r} is the input file; choose another output path")
    if dst.suffix.lower() != ".onnx" or dst.is_dir():
        raise _Usage(f"the output {a.out!r} must be a file name ending in .onnx")
    recipe = load_recipe(a.recipe, a.set)
    given = {
        "method": a.method,
        "calibration_batches": a.calibration_batches,
        "min_agreement": a.min_agreement,
        "keep_float": _keep_float(a.keep_float),
    }
    options = dataclasses.replace(
        recipe.quantize.options(recipe.measure), **{k: v for k, v in given.items() if v is not None}
    )
    train_dl, val_dl = RunContext(recipe, device="cpu", progress=False).kept_loaders()
    res = quantize_onnx(src, dst, train_dl, val_dl, options, progress=not a.json)
    if a.json:
        print(json.dumps(res.to_dict(), indent=1))
    elif res.accepted:
        acc = "" if res.fp32_top1 is None else f", top-1 {res.fp32_top1:.4f} -> {res.int8_top1:.4f}"
        print(
            f"wrote {res.path} ({res.int8_file_bytes} bytes, was {res.fp32_file_bytes}); top-1 agreement "
            f"with the float model {res.top1_agreement:.4f} on {res.validation_rows} images{acc}"
        )
    if not res.accepted:
        print(f"prune-recipe: INT8 model refused: {res.reason}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _keep_float(text: str | None):
    """``--keep-float``: None (the recipe's), "auto", "none" or comma-separated Conv node names."""
    if text is None or text.strip() in ("auto", "none"):
        return None if text is None else text.strip()
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise _Usage(f"--keep-float must be auto, none or Conv node names. Got {text!r}.")
    return names


def _cmd_bench(a) -> int:
    from icnn_compress.errors import DataError, IcnnCompressError
    from icnn_compress.measure import ort_latency, ort_session

    batches = _int_list(a.batch_sizes, "--batch-sizes")
    shape = tuple(_int_list(a.input_shape, "--input-shape")) if a.input_shape else None
    if shape is not None and len(shape) != 3:
        raise _Usage(f"--input-shape must be C,H,W. Got {a.input_shape!r}.")
    sess = ort_session(a.onnx, provider=a.provider, threads=a.threads)
    rows = []
    if not a.json:
        print(f"{'batch':>5} {'median ms':>10} {'p90 ms':>8}  provider")
    for b in batches:
        try:
            s = ort_latency(a.onnx, b, input_shape=shape, session=sess, repeats=a.repeats, threads=a.threads)
        except IcnnCompressError:
            raise
        except Exception as exc:  # ONNX Runtime's own errors (a wrong input shape, ...)
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise DataError(f"ONNX Runtime could not run {a.onnx!r} at batch {b}: {first}") from None
        rows.append({"batch": b, **s.to_dict()})
        if not a.json:
            print(f"{b:>5} {s.median_ms:>10.3f} {s.p90_ms:>8.3f}  {s.provider} ({a.threads} threads)")
    if a.json:
        print(json.dumps(rows, indent=1))
    return EXIT_OK


def _cmd_report(a) -> int:
    from pydantic import ValidationError

    from icnn_compress.recipe import MARKER, Recipe, Runner

    run_dir = Path(a.run_dir)
    resolved = run_dir / "recipe.resolved.json"
    if not (run_dir / MARKER).is_file() or not resolved.is_file():
        raise _Usage(f"{run_dir} is not a run directory of prune-recipe (no {MARKER} or {resolved.name})")
    try:
        recipe = Recipe.model_validate(json.loads(resolved.read_text()))
    except (ValueError, ValidationError, OSError):
        raise _Usage(f"{resolved} is unreadable or not a recipe; run the recipe again") from None
    Runner(recipe, run_dir, resume=True, stages=["report"], rerun=["report"], progress=False).run()
    print(f"report: {Runner.report_file(run_dir)}")
    return EXIT_OK


class _Usage(Exception):
    pass


def _setup_logging(a) -> None:
    """The package logs through ``logging.getLogger("icnn_compress")``: stage lines at INFO on
    stdout (none with -q, debug messages with -v), warnings on stderr, everything at DEBUG with
    timestamps in ``--log-file``."""
    log = logging.getLogger("icnn_compress")
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.DEBUG)
    # 'run --quiet' also silences the stage lines; --json keeps stdout for the JSON alone
    quiet = a.log_quiet or getattr(a, "quiet", False) or getattr(a, "json", False)
    level = logging.WARNING if quiet else logging.DEBUG if a.verbose else logging.INFO
    out = logging.StreamHandler(sys.stdout)
    out.setLevel(level)
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    out.setFormatter(logging.Formatter("%(message)s"))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("prune-recipe: %(levelname)s: %(message)s"))
    log.addHandler(out)
    log.addHandler(err)
    if a.log_file:
        try:
            handler = logging.FileHandler(a.log_file, encoding="utf-8")
        except OSError as exc:
            raise SystemExit(f"prune-recipe: error: --log-file {a.log_file!r}: {exc.strerror}") from None
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (see the module docstring). The logging handlers it
    installs are removed again when it returns (it can be called in-process)."""
    log = logging.getLogger("icnn_compress")
    saved = (log.level, log.propagate)
    try:
        return _main(argv)
    finally:
        for h in log.handlers[:]:
            log.removeHandler(h)
            h.close()
        log.setLevel(saved[0])
        log.propagate = saved[1]


def _main(argv: list[str] | None) -> int:
    try:
        a = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, --version and usage errors (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _setup_logging(a)
    if a.progress:
        import os

        from icnn_compress._progress import PROGRESS_ENV

        os.environ[PROGRESS_ENV] = "always"
    try:
        return _dispatch(a)
    except KeyboardInterrupt:
        print("prune-recipe: interrupted; finished stages are kept (use --resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        from icnn_compress.errors import ConfigError, DataError, IcnnCompressError
        from icnn_compress.recipe import LockError

        if a.debug:
            traceback.print_exc()
        from icnn_compress.recipe._runner import RankStopped

        if isinstance(exc, RankStopped):  # rank 0 reports the error; the others only stop
            return EXIT_FAILED
        if isinstance(exc, LockError):
            code = EXIT_LOCKED
        elif isinstance(exc, (ConfigError, DataError, _Usage)):
            code = EXIT_USAGE
        elif isinstance(exc, IcnnCompressError):
            code = EXIT_FAILED
        else:  # a bug or an environment failure: one line, the traceback only with --debug
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(
                f"prune-recipe: error: unexpected {type(exc).__name__}: {message[:300]} "
                "(rerun with --debug for the traceback)",
                file=sys.stderr,
            )
            return EXIT_FAILED
        message = " ".join(str(exc).split())
        print(f"prune-recipe: error: {message}", file=sys.stderr)
        return code


def _dispatch(a) -> int:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and a.command != "run":
        raise _Usage(
            f"only 'prune-recipe run' runs under torchrun, not {a.command!r}; start it without torchrun."
        )
    if a.command in ("validate", "show"):
        import yaml

        from icnn_compress.recipe import RunContext, load_recipe

        recipe = load_recipe(a.recipe, a.set)
        context = RunContext(recipe, device="cpu", progress=False)
        if a.command == "validate":
            context.check()
            print("ok")
            return EXIT_OK
        context.check_names()  # show: names only, no data read (validate checks the rest)
        if a.json:
            print(json.dumps(recipe.model_dump(mode="json"), indent=1))
        else:
            print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), end="")
        return EXIT_OK
    if a.command == "list":
        from icnn_compress.recipe import bundled_recipes

        rows = []
        for name, path in bundled_recipes().items():
            first = next((ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
            rows.append({"name": name, "description": first, "path": str(path)})
        if a.json:
            print(json.dumps(rows, indent=1))
        for r in rows if not a.json else ():
            print(f"{r['name']:<24} {r['description']}")
        return EXIT_OK
    return {
        "run": _cmd_run,
        "compare": _cmd_compare,
        "export": _cmd_export,
        "quantize": _cmd_quantize,
        "bench": _cmd_bench,
        "report": _cmd_report,
    }[a.command](a)


def console_main() -> NoReturn:
    """The installed ``prune-recipe`` script: :func:`main`, then a quick exit.

    Once the command is done, the exit handlers run (temporary files, logging) and the standard
    streams are flushed; the interpreter's teardown of torch, ONNX Runtime and the rest (1-2 s on a
    2-core CPU, nothing of ours to save) is skipped with ``os._exit``. In-process callers use
    :func:`main`, which returns.
    """
    import atexit
    import os

    code = main()
    try:
        atexit._run_exitfuncs()  # what a normal exit would run, in the same order
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to say
                stream.flush()
        os._exit(code)


if __name__ == "__main__":
    console_main()
