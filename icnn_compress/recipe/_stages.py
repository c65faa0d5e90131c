"""The stage bodies: each reads its inputs from earlier stages' folders and writes its own.

Every function has the signature ``stage(ctx, run, out, key) -> (files, info)``: ``files`` are the
artefacts (relative to ``out``) whose checksums the manifest records, ``info`` goes into the
manifest. ``prune_with`` is the pruning step on its own (``prune-recipe compare`` uses it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

import icnn_compress as ic
from icnn_compress import _dist
from icnn_compress._artefact import save_artefact
from icnn_compress._io import atomic_write_json
from icnn_compress.recipe._context import RunContext
from icnn_compress.recipe._rundir import RunDirectory

log = logging.getLogger(__name__)

__all__ = [
    "STAGE_FUNCTIONS",
    "analyse",
    "export",
    "finetune",
    "measure",
    "prune",
    "prune_with",
    "quantize",
    "recover",
    "report",
]

Output = tuple[list[str], dict]


def _train(
    ctx: RunContext,
    model: nn.Module,
    out: Path,
    key: str,
    stage: str,
    subdir: str = "train",
    kept: bool = False,
    **kwargs,
) -> list[dict]:
    """Fit ``model`` with the recipe's data (``kept``: the kept classes only), checkpointing into
    ``out/<subdir>`` (resumable under ``key``)."""
    train_dl, val_dl = ctx.kept_loaders() if kept else ctx.loaders()
    if ctx.recipe.finetune.tensorboard:
        from icnn_compress.train import TensorBoardLogger

        logger = TensorBoardLogger(out / "tensorboard", prefix=f"{stage}/{subdir}/")
        kwargs["callbacks"] = [*kwargs.get("callbacks", ()), logger]
    trainer = ic.Trainer(
        model,
        train_dl,
        val_dl,
        out_dir=out / subdir,
        resume=True,
        run_key=key,
        device=ctx.device,
        seed=ctx.stage_seed(stage),
        progress=ctx.progress,
        **kwargs,
    )
    return trainer.fit().history


def finetune(ctx: RunContext, run: RunDirectory, out: Path, key: str) -> Output:
    """Fine-tune the base model (with ICNN masks and the loss when ``icnn.enabled``) -> ``model.pt``."""
    ctx.example()
    model = ctx.base_model()
    f = ctx.recipe.finetune
    teacher = ic.frozen_copy(model) if f.distill.enabled and f.epochs > 0 else None  # before the masks
    spec = ctx.icnn_spec(model)
    handle = None
    if spec:  # the masks are on while the loss trains; off for the last icnn.unmask_epochs epochs
        handle = ic.attach_icnn(
            model, spec["layers"], spec["num_classes"], **{**spec["options"], "mask": True}
        )
    info: dict = {"icnn": spec, "distill": teacher is not None, "history": []}
    unmasked = ctx.recipe.icnn.unmask_epochs if handle is not None else 0
    common = dict(
        lr=f.lr,
        optimizer=f.optimizer,
        schedule=f.schedule,
        step_epochs=f.step_epochs,
        gamma=f.gamma,
        lr_end=f.lr_end,
        weight_decay=f.weight_decay,
        clip_grad_norm=f.clip_grad_norm,
        distill=_distill(teacher, f.distill),
    )
    if f.epochs - unmasked > 0:
        info["history"] += _train(
            ctx,
            model,
            out,
            key,
            "finetune",
            epochs=f.epochs - unmasked,
            extra_loss=handle.loss if handle else None,
            **common,
        )
    if unmasked > 0:
        handle.set_masks(False)
        info["history"] += _train(
            ctx, model, out, key, "finetune", subdir="train_unmasked", epochs=unmasked, **common
        )
    if handle is not None:
        info["filter_categories"] = {k: v.tolist() for k, v in handle.filter_categories.items()}
        info["skipped_images"] = handle.skipped_images
        handle.freeze()
    if _dist.rank() == 0:  # under torchrun every rank trains, rank 0 writes
        save_artefact(
            {"state_dict": model.cpu().state_dict()},
            out / "model.pt",
            kind="finetuned-model",
            model=ctx.recipe.model.name,
        )
    return ["model.pt"], info


def _distill(teacher: nn.Module | None, cfg) -> ic.Distillation | None:
    if teacher is None:
        return None
    return ic.Distillation(teacher, weight=cfg.weight, temperature=cfg.temperature)


def _finetuned(ctx: RunContext, run: RunDirectory):
    return ctx.load_finetuned(run.stage_dir("finetune") / "model.pt")


def analyse(ctx: RunContext, run: RunDirectory, out: Path, key: str) -> Output:
    """Signatures and clusters of the ICNN layers' filters -> ``analysis.json`` (+ pictures)."""
    from icnn_compress.analysis import (
        cluster_filters,
        filter_signatures,
        location_instability,
        location_instability_reference,
        part_interpretability,
        plot_cluster_overview,
        plot_filter_gallery,
    )

    model, spec = _finetuned(ctx, run)
    layers = spec["layers"] if spec else ic.icnn.top_layers(model, 1)
    probe = ctx.loaders()[1]
    annotated = _annotated_probe(ctx)
    sigs = filter_signatures(
        model,
        annotated or probe,
        layers,
        num_classes=ctx.recipe.data.num_classes,
        max_images=ctx.recipe.analysis.probe_images,
        progress=ctx.progress,
    )
    summary, files = {}, ["analysis.json"]
    for name, sig in sigs.items():
        cl = cluster_filters(sig, distance_threshold=ctx.recipe.analysis.distance_threshold)
        summary[name] = {
            "filters": sig.num_filters,
            "clusters": cl.num_clusters,
            "ari": cl.ari,
            "alive": float((sig.alive > 0.01).float().mean()),
            "categories": sig.category.tolist(),
            "labels": cl.labels.tolist(),
        }
        if annotated is not None:  # the parts are known: how well do the filters localise them?
            reference = location_instability_reference(sig)
            summary[name] |= {
                "location_instability": location_instability(sig)["score"],
                "location_instability_floor": reference["floor"],
                "location_instability_fixed": reference["fixed"],
                "part_interpretability": part_interpretability(
                    model, annotated, name, max_images=ctx.recipe.analysis.probe_images, progress=False
                )["score"],
            }
        if ctx.recipe.analysis.pictures:
            png = f"clusters_{name.replace('.', '_')}.png"
            plot_cluster_overview(sig, cl, out / png)
            gallery = f"gallery_{name.replace('.', '_')}.png"
            plot_filter_gallery(
                model,
                probe.dataset,
                sig,
                cl,
                out / gallery,
                class_names=getattr(probe.dataset, "classes", None),
                part_names=list(ic.data.PART_NAMES) if ctx.recipe.data.name == "synthetic-parts" else None,
            )
            files += [png, gallery]
    atomic_write_json(summary, out / "analysis.json")
    return files, summary


def _annotated_probe(ctx: RunContext) -> DataLoader | None:
    """The validation images with their part landmarks and masks, where the data set has them
    (synthetic parts; the same images as the validation loader's), else ``None``."""
    d = ctx.recipe.data
    if d.name != "synthetic-parts":
        return None
    images = ic.data.SyntheticParts(
        "val",
        d.val_size,
        annotations=True,
        num_classes=d.num_classes,
        image_size=d.image_size,
        seed=d.seed,
        difficulty=d.difficulty,
    )
    return DataLoader(images, batch_size=ctx.loaders()[1].batch_size)


def prune_with(ctx: RunContext, model: nn.Module, criterion: str | None = None):
    """Prune ``model`` (a copy) to the recipe's target with ``criterion`` (default: the recipe's);
    returns the ``PruneResult``."""
    from icnn_compress.prune import Target, prune_model

    p = ctx.recipe.prune
    refit = ctx.recipe.recover.epochs == 0 if p.refit_classifier is None else p.refit_classifier
    if refit and ctx.teacher("prune") == "base":  # refit to the model the fine-tune started from
        log.info("prune: the classifier is refit to the base model's outputs")
        refit = ctx.base_model().to(next(model.parameters()).device).eval()
    return prune_model(
        model,
        ctx.example(),
        criterion=criterion or p.criterion,
        target=Target(**p.target),
        data=ctx.loaders()[0],
        compensate=p.compensate,
        round_to=p.round_to,
        allocation=p.allocation,
        max_layer_ratio=p.max_layer_ratio,
        global_ranking=p.global_ranking,
        ignored_layers=p.ignored_layers,
        step_ratio=p.step_ratio,
        bn_batches=p.bn_batches,
        refit_classifier=refit,
        keep_classes=p.keep_classes,
        keep_classes_mode=p.keep_classes_mode,
        criterion_options=_criterion_options(ctx, criterion or p.criterion),
        progress=ctx.progress,
    )


def _criterion_options(ctx: RunContext, criterion: str) -> dict:
    """The options ``criterion`` is built with: icnn-cluster's clusters at the analysis' distance
    threshold; ``prune.criterion_options`` when it is the recipe's criterion (not a compared one)."""
    options = {}
    if criterion == "icnn-cluster":
        options["distance_threshold"] = ctx.recipe.analysis.distance_threshold
    if criterion == ctx.recipe.prune.criterion:
        options.update(ctx.recipe.prune.criterion_options)
    return options


def _unpruned(ctx: RunContext, run: RunDirectory, *, base: bool = False) -> nn.Module:
    """The fine-tuned model (``base``: the model the fine-tune started from), its classifier
    restricted to ``prune.keep_classes`` when the recipe specialises: the reference that the pruned
    model is measured against and distilled from."""
    from icnn_compress.prune import restrict_classifier

    model = ctx.base_model() if base else _finetuned(ctx, run)[0]
    kept = ctx.recipe.prune.keep_classes
    return restrict_classifier(model, kept) if kept is not None else model


def _save_pruned(ctx: RunContext, model: nn.Module, history: list, path: Path, spec, meta: dict) -> None:
    from icnn_compress.prune import save_pruned

    m = ctx.recipe.model
    save_pruned(
        model.cpu(),
        path,
        arch=m.name,
        history=history,
        input_shape=tuple(ctx.example().shape[1:]),
        arch_kwargs={
            "num_classes": ctx.recipe.data.num_classes,
            "in_channels": m.in_channels,
            "small_input": m.small_input,
        },
        icnn=spec,
        metadata=meta,
    )


def prune(ctx: RunContext, run: RunDirectory, out: Path, key: str) -> Output:
    """Prune the fine-tuned model to the target -> ``pruned.pt`` and ``prune.json``."""
    model, spec = _finetuned(ctx, run)
    res = prune_with(ctx, model)
    summary = res.summary()
    if res.classifier_refit:  # whose outputs the classifier was refit to
        summary["refit_teacher"] = ctx.teacher("prune")
    _save_pruned(ctx, res.model, res.history, out / "pruned.pt", spec, summary)
    atomic_write_json({**summary, "absorbed": res.absorbed_json()}, out / "prune.json")
    return ["pruned.pt", "prune.json"], summary


def recover(ctx: RunContext, run: RunDirectory, out: Path, key: str) -> Output:
    """Fine-tune the pruned model briefly -> ``recovered.pt`` (a copy of it with ``epochs: 0``)."""
    from icnn_compress.prune import read_pruned_record, rebuild_pruned

    record = read_pruned_record(run.stage_dir("prune") / "pruned.pt")
    model, meta = rebuild_pruned(record), json.loads(record["metadata"])
    r = ctx.recipe.recover
    source = ctx.teacher("recover")
    info: dict = {"distill": r.distill.enabled and r.epochs > 0, "teacher": source}
    if r.epochs > 0:
        if r.distill.enabled:
            log.info("recover: distilling from the %s model", source)
        teacher = _unpruned(ctx, run, base=source == "base") if r.distill.enabled else None
        info["history"] = _train(
            ctx,
            model,
            out,
            key,
            "recover",
            kept=True,
            epochs=r.epochs,
            lr=r.lr,
            distill=_distill(ic.frozen_copy(teacher) if teacher is not None else None, r.distill),
        )
    history = [tuple(h) for h in json.loads(record["history"])]
    spec = json.loads(record["icnn"]) if record["icnn"] else None
    if _dist.rank() == 0:  # under torchrun every rank trains, rank 0 writes
        _save_pruned(ctx, model, history, out / "recovered.pt", spec, meta)
    return ["recovered.pt"], info


def export(ctx: RunContext, run: RunDirectory, out: Path, key: str) -> Output:
    """Export the fine-tuned and the recovered model to ONNX (with parity checks)."""
    from icnn_compress.export import export_onnx
    from icnn_compress.prune import load_pruned

    example = ctx.example().cpu()
    model = _unpruned(ctx, run)
    d = ctx.recipe.data
    meta = {
        "classes": ctx.recipe.prune.keep_classes or list(range(d.num_classes)),
        "preprocessing": {"dataset": d.name, "image_size": d.image_size},
        "recipe": ctx.recipe.name,
        "stage_key": key,
    }
    opset = ctx.recipe.export.opset
    a = export_onnx(model, out / "unpruned.onnx", example, opset=opset, metadata=meta)
    pruned, _ = load_pruned(run.stage_dir("recover") / "recovered.pt")
    b = export_onnx(pruned.eval(), out / "model.onnx", example, opset=opset, metadata=meta)
    return ["unpruned.onnx", "model.onnx"], {"unpruned": a.to_dict(), "pruned": b.to_dict()}


def quantize(ctx: RunContext, run: RunDirectory, out: Path, key: str) -> Output:
    """INT8 copy of the pruned ONNX model, calibrated on training batches and guarded on the
    validation set -> ``model.int8.onnx`` (when accepted) and ``quantize.json``."""
    from icnn_compress.quantize import quantize_onnx

    q = ctx.recipe.quantize
    if not q.enabled:
        atomic_write_json({"enabled": False}, out / "quantize.json")
        return ["quantize.json"], {"enabled": False}
    train_dl, val_dl = ctx.kept_loaders()
    res = quantize_onnx(
        run.stage_dir("export") / "model.onnx",
        out / "model.int8.onnx",
        train_dl,
        val_dl,
        q.options(ctx.recipe.measure),
        progress=ctx.progress,
    )
    info = {"enabled": True, **res.to_dict(), "path": "model.int8.onnx" if res.accepted else None}
    atomic_write_json(info, out / "quantize.json")
    summary = {k: info[k] for k in ("accepted", "top1_agreement", "fp32_top1", "int8_top1", "reason")}
    return (["model.int8.onnx"] if res.accepted else []) + ["quantize.json"], summary


def measure(ctx: RunContext, run: RunDirectory, out: Path, key: str) -> Output:
    """Accuracy and latency in ONNX Runtime of the unpruned and the pruned model, and of the INT8
    copy when the quantize stage accepted one -> ``measurements.json``."""
    from icnn_compress.measure import measure as measure_model
    from icnn_compress.prune import load_pruned

    m = ctx.recipe.measure
    example = ctx.example().cpu()
    val_dl = ctx.kept_loaders()[1]
    class_names = getattr(val_dl.dataset, "classes", None)
    models = {
        "unpruned": _unpruned(ctx, run),
        "pruned": load_pruned(run.stage_dir("recover") / "recovered.pt")[0].eval(),
    }
    settings = dict(
        batch_sizes=tuple(m.batch_sizes),
        threads=m.threads,
        provider=m.provider,
        example=example,
        repeats=m.repeats,
        class_names=class_names,
    )
    entries = []
    for name, model in models.items():
        onnx = run.stage_dir("export") / ("unpruned.onnx" if name == "unpruned" else "model.onnx")
        entry = measure_model(onnx, val_dl, name=name, torch_model=model, **settings)
        entry["widths"] = {n: c.out_channels for n, c in model.named_modules() if isinstance(c, nn.Conv2d)}
        entry["precision"] = "fp32"
        entries.append(entry)
    quantized = json.loads((run.stage_dir("quantize") / "quantize.json").read_text())
    if quantized.get("accepted"):
        entry = measure_model(
            run.stage_dir("quantize") / "model.int8.onnx", val_dl, name="pruned-int8", **settings
        )
        pruned = entries[-1]
        # the same network in 8-bit: MACs and parameter counts are the pruned model's
        entry.update({k: pruned[k] for k in ("macs", "params") if k in pruned})
        entry["precision"] = "int8"
        entry["top1_agreement_with_fp32"] = quantized["top1_agreement"]
        entry["kept_float"] = quantized.get("kept_float", [])
        entries.append(entry)
    elif quantized.get("enabled"):
        entries[-1]["int8_refused"] = quantized.get("reason", "")
    atomic_write_json(entries, out / "measurements.json")
    return ["measurements.json"], {e["name"]: e.get("accuracy") for e in entries}


def report(ctx: RunContext, run: RunDirectory, out: Path, key: str) -> Output:
    """The HTML/Markdown/JSON report of the run."""
    from icnn_compress.report import build_report, write_report

    entries = json.loads((run.stage_dir("measure") / "measurements.json").read_text())
    analysis = _analysis(run)
    batch = max(ctx.recipe.measure.batch_sizes)
    rep = build_report(
        entries,
        title=f"icnn-compress: {ctx.recipe.name}",
        speedup_batch=batch,
        removed_filters=_removed_filters(run, analysis),
        interpretability=_analysed_layers(analysis),
    )
    analysed = run.stage_dir("analyse")
    pictures = sorted(analysed.glob("*.png")) if run.finished("analyse")[0] else []
    paths = write_report(rep, out, analysis_pictures=pictures, batch=batch)
    return [p.name for p in paths.values()], {"report": str(paths["html"])}


def _analysis(run: RunDirectory) -> dict:
    """The finished analyse stage's ``analysis.json`` (layer -> summary), or ``{}``."""
    analysis_file = run.stage_dir("analyse") / "analysis.json"
    if not (run.finished("analyse")[0] and analysis_file.is_file()):
        return {}
    return json.loads(analysis_file.read_text())


def _analysed_layers(analysis: dict) -> list[dict]:
    """One row per analysed layer for the report: ``analysis`` without the per-filter lists."""
    per_filter = ("categories", "labels")
    return [
        {"layer": layer, **{k: v for k, v in info.items() if k not in per_filter}}
        for layer, info in analysis.items()
    ]


def _removed_filters(run: RunDirectory, analysis: dict) -> list[dict]:
    """The analysed layers' removed filters with their cluster and category and the kept filters
    that absorbed them (from ``analysis`` and ``prune.json``; empty when either is missing).
    A layer that is a block (ResNet) is matched to its last conv, whose outputs are the block's."""
    prune_file = run.stage_dir("prune") / "prune.json"
    if not (analysis and prune_file.is_file()):
        return []
    pruned = json.loads(prune_file.read_text())
    absorbed = pruned.get("absorbed", {})
    rows = []
    for layer, info in analysis.items():
        conv = (
            layer
            if layer in absorbed
            else next((n for n in reversed(list(absorbed)) if n.startswith(layer + ".")), None)
        )
        if conv is None:
            continue
        labels, cats = info.get("labels", []), info.get("categories", [])
        for r, ks in sorted(absorbed[conv].items(), key=lambda kv: int(kv[0])):
            f = int(r)
            rows.append(
                {
                    "layer": layer,
                    "filter": f,
                    "cluster": labels[f] if f < len(labels) else None,
                    "category": cats[f] if f < len(cats) else None,
                    "absorbed_by": [
                        [int(k), float(w), labels[k] if k < len(labels) else None] for k, w in ks
                    ],
                }
            )
    return rows


STAGE_FUNCTIONS = {
    "finetune": finetune,
    "analyse": analyse,
    "prune": prune,
    "recover": recover,
    "export": export,
    "quantize": quantize,
    "measure": measure,
    "report": report,
}
