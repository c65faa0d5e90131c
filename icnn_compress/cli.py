"""The ``prune-recipe`` command: a thin shell over the Python API.

Exit codes: 0 success; 1 the run failed (e.g. training diverged); 2 bad usage, recipe or input
(one line on stderr, no traceback); 3 the run directory is locked by another run; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: one line, exit 2
        self.print_usage(sys.stderr)
        sys.stderr.write(f"prune-recipe: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="prune-recipe",
        description="Fine-tune with interpretable filters, prune, export and measure, from a YAML recipe.",
        epilog="Exit codes: 0 ok, 1 run failed, 2 bad usage/recipe, 3 run directory locked, 130 interrupted.",
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
    r.add_argument("--resume", action="store_true", help="skip finished stages (checksums verified)")
    r.add_argument("--force", action="store_true", help="replace an existing run directory")
    r.add_argument("--stages", default=None, help="comma-separated subset of stages")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    v = sub.add_parser("validate", help="check a recipe; prints 'ok' or the first error")
    recipe_args(v)
    s = sub.add_parser("show", help="print the fully resolved recipe (YAML)")
    recipe_args(s)
    sub.add_parser("list", help="list the bundled recipes")
    c = sub.add_parser("compare", help="prune the same fine-tuned model with several criteria; one table")
    recipe_args(c)
    c.add_argument("--criteria", required=True, help="comma-separated, e.g. icnn-cluster,l1,fpgm")
    c.add_argument("--out", default=None)
    c.add_argument("--device", default=None)
    c.add_argument("--quiet", action="store_true")
    e = sub.add_parser("export", help="export a pruned model file (save_pruned format) to ONNX")
    e.add_argument("pruned", help="a .pt written by save_pruned (e.g. RUN/4_recover/recovered.pt)")
    e.add_argument("onnx", help="output .onnx")
    e.add_argument("--opset", type=int, default=None)
    b = sub.add_parser("bench", help="ONNX Runtime latency of an ONNX file")
    b.add_argument("onnx")
    b.add_argument("--batch-sizes", default="1,32")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda", "tensorrt"])
    b.add_argument("--repeats", type=int, default=50)
    b.add_argument("--input-shape", default=None, help="C,H,W when the model's input is not static")
    rp = sub.add_parser("report", help="(re)write the report of a run directory")
    rp.add_argument("run_dir")
    return p


def _cmd_run(a) -> int:
    from icnn_compress.recipe import Runner, load_recipe

    recipe = load_recipe(a.recipe, a.set)
    stages = a.stages.split(",") if a.stages else None
    out = a.out or f"runs/{recipe.name}"
    run_dir = Runner(
        recipe, out, resume=a.resume, force=a.force, stages=stages, device=a.device, progress=not a.quiet
    ).run()
    report = run_dir / "7_report" / "report.html"
    print(f"run finished: {run_dir}" + (f"\nreport: {report}" if report.is_file() else ""))
    return EXIT_OK


def _cmd_compare(a) -> int:
    from icnn_compress.export import export_onnx
    from icnn_compress.measure import measure
    from icnn_compress.recipe import Runner, load_recipe

    recipe = load_recipe(a.recipe, a.set)
    from icnn_compress.prune import list_criteria

    criteria = [c.strip() for c in a.criteria.split(",") if c.strip()]
    bad = [c for c in criteria if c not in list_criteria()]
    if bad:
        raise _Usage(f"unknown criteria {bad}; available: {', '.join(list_criteria())}")
    out = Path(a.out or f"runs/{recipe.name}")
    runner = Runner(recipe, out, resume=True, stages=["finetune"], device=a.device, progress=not a.quiet)
    runner.run()
    base, _ = runner.finetuned_model()
    example = runner.example().cpu()
    val_dl = runner.loaders()[1]
    rows = []
    for crit in criteria:
        res = runner._prune(base, crit)
        path = out / "compare" / f"{crit}.onnx"
        export_onnx(res.model.eval().cpu(), path, example)
        entry = measure(
            path,
            val_dl,
            name=crit,
            batch_sizes=(1,),
            threads=recipe.measure.threads,
            provider="cpu",
            repeats=recipe.measure.repeats,
        )
        rows.append(
            {
                "criterion": crit,
                "accuracy": entry["accuracy"],
                "macs_reduction": res.macs_reduction,
                "latency_b1_ms": entry["latency"]["1"]["median_ms"],
            }
        )
    (out / "compare").mkdir(parents=True, exist_ok=True)
    (out / "compare" / "compare.json").write_text(json.dumps(rows, indent=2))
    print(f"{'criterion':<16} {'accuracy':>9} {'MACs red.':>9} {'b1 ms':>8}")
    for r in rows:
        print(
            f"{r['criterion']:<16} {r['accuracy']:>9.4f} {r['macs_reduction']:>8.2f}x "
            f"{r['latency_b1_ms']:>8.3f}"
        )
    return EXIT_OK


def _cmd_export(a) -> int:
    import torch

    from icnn_compress.export import export_onnx
    from icnn_compress.prune import load_pruned

    model, meta = load_pruned(a.pruned)
    record = torch.load(a.pruned, weights_only=True)
    example = torch.rand(1, *record["input_shape"])
    res = export_onnx(
        model.eval(), a.onnx, example, opset=a.opset, metadata={"source": str(a.pruned), **meta}
    )
    print(
        f"wrote {res.path} ({res.file_bytes} bytes, opset {res.opset}, "
        f"max |onnx - torch| {res.max_abs_diff:.2e})"
    )
    return EXIT_OK


def _cmd_bench(a) -> int:
    from icnn_compress.measure import ort_latency

    if not Path(a.onnx).is_file():
        raise _Usage(f"ONNX file {a.onnx!r} does not exist")
    shape = tuple(int(v) for v in a.input_shape.split(",")) if a.input_shape else None
    print(f"{'batch':>5} {'median ms':>10} {'p90 ms':>8}  provider")
    for b in (int(v) for v in a.batch_sizes.split(",")):
        s = ort_latency(
            a.onnx, b, input_shape=shape, provider=a.provider, threads=a.threads, repeats=a.repeats
        )
        print(f"{b:>5} {s.median_ms:>10.3f} {s.p90_ms:>8.3f}  {s.provider} ({a.threads} threads)")
    return EXIT_OK


def _cmd_report(a) -> int:
    from icnn_compress.recipe import Recipe, Runner

    run_dir = Path(a.run_dir)
    resolved = run_dir / "recipe.resolved.json"
    if not resolved.is_file():
        raise _Usage(f"{run_dir} is not a run directory (no recipe.resolved.json)")
    recipe = Recipe.model_validate(json.loads(resolved.read_text()))
    Runner(recipe, run_dir, resume=True, stages=["report"], progress=False).run()
    print(f"report: {run_dir / '7_report' / 'report.html'}")
    return EXIT_OK


class _Usage(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (see the module docstring)."""
    from icnn_compress.errors import ConfigError, IcnnCompressError
    from icnn_compress.recipe import LockError

    a = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if a.command in ("validate", "show"):
            import yaml

            from icnn_compress.recipe import load_recipe

            recipe = load_recipe(a.recipe, a.set)
            print(
                "ok" if a.command == "validate" else yaml.safe_dump(recipe.model_dump(), sort_keys=False),
                end="\n",
            )
            return EXIT_OK
        if a.command == "list":
            from icnn_compress.recipe import bundled_recipes, load_recipe

            for name, path in bundled_recipes().items():
                first = next(
                    (ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")), ""
                )
                print(f"{name:<24} {first}")
            return EXIT_OK
        return {
            "run": _cmd_run,
            "compare": _cmd_compare,
            "export": _cmd_export,
            "bench": _cmd_bench,
            "report": _cmd_report,
        }[a.command](a)
    except LockError as exc:
        print(f"prune-recipe: error: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except (ConfigError, _Usage) as exc:
        print(f"prune-recipe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("prune-recipe: interrupted; finished stages are kept (use --resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except IcnnCompressError as exc:
        print(f"prune-recipe: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
