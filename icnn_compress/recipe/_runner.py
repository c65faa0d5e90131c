"""The stage runner: one folder per stage with its artefacts and a manifest; resumable and locked.

A stage is finished when its ``manifest.json`` exists (written last, atomically) and the
checksums it lists still match. ``resume`` skips finished stages; a kill inside a stage loses at
most that stage (the fine-tune resumes from its last epoch checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

import icnn_compress as ic
from icnn_compress._io import atomic_save, atomic_write_json, environment_info
from icnn_compress.errors import ConfigError, IcnnCompressError
from icnn_compress.recipe._load import recipe_hash
from icnn_compress.recipe._schema import Recipe

__all__ = ["STAGES", "LockError", "RunLock", "Runner", "run_recipe"]

STAGES = ("finetune", "analyse", "prune", "recover", "export", "measure", "report")


class LockError(IcnnCompressError):
    """Another run holds the run directory."""


class RunLock:
    """An exclusive lock file (``O_EXCL``) holding the owner's pid; a stale lock (dead pid) is taken over."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise LockError(
                        f"{self.path.parent} is in use by another run (pid {pid}); wait for it "
                        "to finish or use another --out."
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise LockError(f"Could not lock {self.path.parent}.")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Runner:
    """Runs a recipe's stages into ``run_dir`` (see ``STAGES``).

    Args:
        recipe: the validated recipe.
        run_dir: output folder; an existing one is refused unless ``resume`` or ``force``.
        resume: skip finished stages whose checksums verify.
        force: delete an existing ``run_dir`` first.
        stages: run only these stages (their inputs must exist from an earlier run).
        device: ``"cpu"``, ``"cuda"``...; ``None`` = CUDA when available.
        progress: progress bars and one line per stage on stdout.
    """

    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | os.PathLike,
        *,
        resume: bool = False,
        force: bool = False,
        stages: list[str] | None = None,
        device: str | None = None,
        progress: bool = True,
    ) -> None:
        bad = [s for s in stages or [] if s not in STAGES]
        if bad:
            raise ConfigError(f"Unknown stage(s) {bad}; stages are {', '.join(STAGES)}.")
        self.recipe, self.run_dir = recipe, Path(run_dir)
        self.resume, self.force = resume, force
        self.stages = [s for s in STAGES if s in (stages or STAGES)]
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.progress = progress
        self.hash = recipe_hash(recipe)
        self._loaders = None

    # ----- helpers -----
    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / f"{STAGES.index(stage) + 1}_{stage}"

    def _say(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)

    def finished(self, stage: str) -> bool:
        """True when ``stage`` has a manifest from this recipe and its files verify."""
        manifest = self.stage_dir(stage) / "manifest.json"
        if not manifest.is_file():
            return False
        data = json.loads(manifest.read_text())
        if data.get("recipe_hash") != self.hash:
            return False
        for rel, digest in data.get("checksums", {}).items():
            f = self.stage_dir(stage) / rel
            if not f.is_file() or _sha256(f) != digest:
                self._say(f"[{stage}] checksum mismatch for {rel}: running the stage again")
                return False
        return True

    def loaders(self):
        if self._loaders is None:
            d = self.recipe.data
            opts = {
                "num_classes": d.num_classes,
                "image_size": d.image_size,
                "train_size": d.train_size,
                "val_size": d.val_size,
                "limit": d.limit,
            }
            if d.root:
                opts["root"] = d.root
            self._loaders = ic.data.loaders(
                d.name, batch_size=d.batch_size, num_workers=d.num_workers, seed=d.seed, **opts
            )
        return self._loaders

    def example(self) -> torch.Tensor:
        x = next(iter(self.loaders()[1]))[0][:1]
        if x.shape[1] != self.recipe.model.in_channels:
            raise ConfigError(
                f"The data has {x.shape[1]} channels but model.in_channels is "
                f"{self.recipe.model.in_channels}: set model.in_channels={x.shape[1]}."
            )
        return x

    def base_model(self) -> nn.Module:
        m = self.recipe.model
        return ic.models.create(
            m.name,
            num_classes=self.recipe.data.num_classes,
            in_channels=m.in_channels,
            small_input=m.small_input,
            weights=m.weights,
        )

    def icnn_spec(self, model: nn.Module) -> dict | None:
        c = self.recipe.icnn
        if not c.enabled:
            return None
        layers = [ic.icnn.last_conv_name(model)] if c.layers == "auto" else list(c.layers)
        options = {
            "weight": c.weight,
            "balance": c.balance,
            "warmup_steps": c.warmup_steps,
            "beta": c.beta,
            "centre": c.centre,
            "categories": c.categories,
        }
        return {"layers": layers, "num_classes": self.recipe.data.num_classes, "options": options}

    def finetuned_model(self) -> tuple[nn.Module, dict | None]:
        model = self.base_model()
        spec = self.icnn_spec(model)
        if spec:
            ic.attach_icnn(model, spec["layers"], spec["num_classes"], **spec["options"]).freeze()
        state = torch.load(self.stage_dir("finetune") / "model.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model.eval(), spec

    # ----- running -----
    def run(self) -> Path:
        """Run the stages; returns the run directory."""
        if self.run_dir.exists() and any(self.run_dir.iterdir()) and not (self.resume or self.force):
            raise ConfigError(
                f"Run directory {self.run_dir} exists: pass --resume to continue it or --force to replace it."
            )
        if self.force and self.run_dir.exists():
            with RunLock(self.run_dir):
                pass  # refuse to delete a directory that another run holds
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.run_dir):
            atomic_write_json(self.recipe.model_dump(), self.run_dir / "recipe.resolved.json")
            torch.manual_seed(self.recipe.seed)
            stale = False
            for stage in self.stages:
                if self.resume and not stale and self.finished(stage):
                    self._say(f"[{stage}] finished earlier, checksums verified: skipped")
                    continue
                stale = True  # every later stage depends on this one's outputs
                t0 = time.perf_counter()
                out = self.stage_dir(stage)
                out.mkdir(parents=True, exist_ok=True)
                files, info = getattr(self, f"_stage_{stage}")(out)
                atomic_write_json(
                    {
                        "stage": stage,
                        "recipe_hash": self.hash,
                        "seconds": time.perf_counter() - t0,
                        "versions": environment_info(),
                        "info": info,
                        "checksums": {f: _sha256(out / f) for f in files},
                    },
                    out / "manifest.json",
                )
                self._say(f"[{stage}] done in {time.perf_counter() - t0:.1f} s -> {out}")
        return self.run_dir

    def _train(self, model: nn.Module, out: Path, **kwargs) -> list[dict]:
        """Fit ``model`` with the recipe's data, checkpointing into ``out/train`` (resumable)."""
        train_dl, val_dl = self.loaders()
        trainer = ic.Trainer(
            model,
            train_dl,
            val_dl,
            out_dir=out / "train",
            resume=True,
            device=self.device,
            seed=self.recipe.seed,
            progress=self.progress,
            **kwargs,
        )
        return trainer.fit().history

    # ----- the stages -----
    def _stage_finetune(self, out: Path):
        self.example()
        model = self.base_model()
        spec = self.icnn_spec(model)
        handle = (
            ic.attach_icnn(model, spec["layers"], spec["num_classes"], **spec["options"]) if spec else None
        )
        f = self.recipe.finetune
        info: dict = {"icnn": spec}
        if f.epochs > 0:
            info["history"] = self._train(
                model,
                out,
                epochs=f.epochs,
                lr=f.lr,
                optimizer=f.optimizer,
                schedule=f.schedule,
                lr_end=f.lr_end,
                weight_decay=f.weight_decay,
                clip_grad_norm=f.clip_grad_norm,
                extra_loss=handle.loss if handle else None,
            )
        if handle is not None:
            info["filter_categories"] = {k: v.tolist() for k, v in handle.filter_categories.items()}
            handle.freeze()
        atomic_save(model.cpu().state_dict(), out / "model.pt")
        return ["model.pt"], info

    def _stage_analyse(self, out: Path):
        from icnn_compress.analysis import cluster_filters, filter_signatures, plot_cluster_overview

        model, spec = self.finetuned_model()
        layers = spec["layers"] if spec else [ic.icnn.last_conv_name(model)]
        sigs = filter_signatures(
            model,
            self.loaders()[1],
            layers,
            num_classes=self.recipe.data.num_classes,
            max_images=self.recipe.analysis.probe_images,
            progress=self.progress,
        )
        summary, files = {}, ["analysis.json"]
        for name, sig in sigs.items():
            cl = cluster_filters(sig, distance_threshold=self.recipe.analysis.distance_threshold)
            summary[name] = {
                "filters": sig.num_filters,
                "clusters": cl.num_clusters,
                "ari": cl.ari,
                "alive": float((sig.alive > 0.01).float().mean()),
                "categories": sig.category.tolist(),
                "labels": cl.labels.tolist(),
            }
            if self.recipe.analysis.pictures:
                png = f"clusters_{name.replace('.', '_')}.png"
                plot_cluster_overview(sig, cl, out / png)
                files.append(png)
        atomic_write_json(summary, out / "analysis.json")
        return files, summary

    def _prune(self, model: nn.Module, criterion: str | None = None):
        from icnn_compress.prune import Target, prune_model

        p = self.recipe.prune
        return prune_model(
            model,
            self.example(),
            criterion=criterion or p.criterion,
            target=Target(macs_reduction=p.macs_reduction),
            data=self.loaders()[0],
            compensate=p.compensate,
            round_to=p.round_to,
            max_layer_ratio=p.max_layer_ratio,
            global_ranking=p.global_ranking,
            ignored_layers=p.ignored_layers,
            step_ratio=p.step_ratio,
            bn_batches=p.bn_batches,
            progress=self.progress,
        )

    def _save_pruned(
        self, model: nn.Module, history: list, path: Path, spec: dict | None, meta: dict
    ) -> None:
        from icnn_compress.prune import save_pruned

        m = self.recipe.model
        save_pruned(
            model.cpu(),
            path,
            arch=m.name,
            history=history,
            input_shape=tuple(self.example().shape[1:]),
            arch_kwargs={
                "num_classes": self.recipe.data.num_classes,
                "in_channels": m.in_channels,
                "small_input": m.small_input,
            },
            icnn=spec,
            metadata=meta,
        )

    def _stage_prune(self, out: Path):
        model, spec = self.finetuned_model()
        res = self._prune(model)
        summary = res.summary()
        self._save_pruned(res.model, res.history, out / "pruned.pt", spec, summary)
        atomic_write_json(summary, out / "prune.json")
        return ["pruned.pt", "prune.json"], summary

    def _stage_recover(self, out: Path):
        from icnn_compress.prune import load_pruned

        model, meta = load_pruned(self.stage_dir("prune") / "pruned.pt")
        r = self.recipe.recover
        info: dict = {}
        if r.epochs > 0:
            info["history"] = self._train(model, out, epochs=r.epochs, lr=r.lr)
        record = torch.load(self.stage_dir("prune") / "pruned.pt", weights_only=True)
        history = [tuple(h) for h in json.loads(record["history"])]
        spec = json.loads(record["icnn"]) if record["icnn"] else None
        self._save_pruned(model, history, out / "recovered.pt", spec, meta)
        return ["recovered.pt"], info

    def _stage_export(self, out: Path):
        from icnn_compress.export import export_onnx
        from icnn_compress.prune import load_pruned

        example = self.example().cpu()
        model, _ = self.finetuned_model()
        d = self.recipe.data
        meta = {
            "classes": list(range(d.num_classes)),
            "preprocessing": {"dataset": d.name, "image_size": d.image_size},
            "recipe": self.recipe.name,
            "recipe_hash": self.hash,
        }
        a = export_onnx(model, out / "unpruned.onnx", example, opset=self.recipe.export.opset, metadata=meta)
        src = self.stage_dir("recover") / "recovered.pt"
        if not src.is_file():
            src = self.stage_dir("prune") / "pruned.pt"
        pruned, _ = load_pruned(src)
        b = export_onnx(
            pruned.eval(), out / "model.onnx", example, opset=self.recipe.export.opset, metadata=meta
        )
        return ["unpruned.onnx", "model.onnx"], {"unpruned": a.to_dict(), "pruned": b.to_dict()}

    def _stage_measure(self, out: Path):
        from icnn_compress.measure import measure
        from icnn_compress.prune import load_pruned

        m = self.recipe.measure
        example = self.example().cpu()
        val_dl = self.loaders()[1]
        models = {"unpruned": self.finetuned_model()[0]}
        src = self.stage_dir("recover") / "recovered.pt"
        models["pruned"] = load_pruned(src if src.is_file() else self.stage_dir("prune") / "pruned.pt")[
            0
        ].eval()
        entries = []
        for name, model in models.items():
            onnx = self.stage_dir("export") / ("unpruned.onnx" if name == "unpruned" else "model.onnx")
            entry = measure(
                onnx,
                val_dl,
                name=name,
                batch_sizes=tuple(m.batch_sizes),
                threads=m.threads,
                provider=m.provider,
                torch_model=model,
                example=example,
                repeats=m.repeats,
            )
            entry["widths"] = {
                n: c.out_channels for n, c in model.named_modules() if isinstance(c, nn.Conv2d)
            }
            entries.append(entry)
        atomic_write_json(entries, out / "measurements.json")
        return ["measurements.json"], {e["name"]: e.get("accuracy") for e in entries}

    def _stage_report(self, out: Path):
        from icnn_compress.report import build_report, write_report

        entries = json.loads((self.stage_dir("measure") / "measurements.json").read_text())
        batch = max(self.recipe.measure.batch_sizes)
        report = build_report(entries, title=f"icnn-compress: {self.recipe.name}", speedup_batch=batch)
        pictures = (
            sorted(self.stage_dir("analyse").glob("*.png")) if self.stage_dir("analyse").is_dir() else []
        )
        paths = write_report(report, out, analysis_pictures=pictures, batch=batch)
        return [p.name for p in paths.values()], {"report": str(paths["html"])}


def run_recipe(recipe: Recipe, run_dir, **kwargs) -> Path:
    """Python entry point of ``prune-recipe run``."""
    return Runner(recipe, run_dir, **kwargs).run()
