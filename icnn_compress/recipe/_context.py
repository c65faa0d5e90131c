"""What a recipe turns into: loaders, models, ICNN options, per-stage seeds, and the checks that
resolve every name in it before a run touches the disk."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

import icnn_compress as ic
from icnn_compress import _dist
from icnn_compress.errors import ConfigError, IcnnCompressError
from icnn_compress.recipe._schema import Recipe, resolve_teacher

__all__ = ["RunContext", "resolve_device"]


def resolve_device(device: str | None) -> str:
    """``device`` checked (``"cpu"``, ``"cuda"``, ``"cuda:1"``...), or the default: CUDA when present."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"Unknown device {device!r}; use cpu, cuda or cuda:<index>.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"Device {device!r} was asked for, but CUDA is not available here; use cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"Device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices).")
    elif dev.type != "cpu":
        raise ConfigError(f"Device {device!r} is not supported; use cpu, cuda or cuda:<index>.")
    return str(dev)


class RunContext:
    """Turns a validated ``Recipe`` into objects: data loaders, the model, the ICNN options.

    Every stage calls ``start_stage`` first: the torch/numpy/random seeds and the training loader's
    shuffling generator are set from ``(recipe.seed, data.seed, stage)``, so a stage gives the same
    result whether earlier stages ran in this process, in another one, or were resumed.
    """

    def __init__(self, recipe: Recipe, device: str | None = None, progress: bool = True) -> None:
        self.recipe = recipe
        self.device = resolve_device(device)
        self.progress = progress
        # under torchrun the training stages read one shard per rank (``shard``, set by the
        # runner); every other stage runs on rank 0 alone and reads all the data
        self.shard = False
        self._loaders: dict[bool, tuple] = {}
        self._kept_loaders: dict[bool, tuple] = {}
        self._base_skipped: list[str] | None = None

    # ----- seeds -----
    def stage_seed(self, stage: str) -> int:
        """A seed in [0, 2**31) derived from the recipe's seeds and the stage name."""
        text = f"{self.recipe.seed}:{self.recipe.data.seed}:{stage}"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF

    def start_stage(self, stage: str) -> int:
        """Seed everything a stage draws from; returns the stage's seed."""
        seed = self.stage_seed(stage)
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        for pair in (*self._loaders.values(), *self._kept_loaders.values()):
            gen = getattr(pair[0], "generator", None)
            if gen is not None:
                gen.manual_seed(seed)
        return seed

    # ----- data and models -----
    def loaders(self):
        """``(train_loader, val_loader)`` of the recipe's data (built once)."""
        shard = self.shard and _dist.is_distributed()
        if shard not in self._loaders:
            d = self.recipe.data
            opts = {
                "num_classes": d.num_classes,
                "image_size": d.image_size,
                "train_size": d.train_size,
                "val_size": d.val_size,
                "limit": d.limit,
                "difficulty": d.difficulty,
            }
            if d.root:
                opts["root"] = d.root
            self._loaders[shard] = ic.data.loaders(
                d.name,
                batch_size=d.batch_size,
                num_workers=d.num_workers,
                seed=d.seed,
                distributed=shard,
                **opts,
            )
        return self._loaders[shard]

    def kept_loaders(self):
        """``(train_loader, val_loader)`` restricted to ``prune.keep_classes`` (labels renumbered
        0..k-1 in that order), or the recipe's loaders when it keeps every class."""
        kept = self.recipe.prune.keep_classes
        if kept is None:
            return self.loaders()
        shard = self.shard and _dist.is_distributed()
        if shard not in self._kept_loaders:
            from torch.utils.data import DataLoader, DistributedSampler

            train_dl, val_dl = self.loaders()
            d = self.recipe.data
            train = ic.data.ClassSubset(train_dl.dataset, kept)
            val = ic.data.ClassSubset(val_dl.dataset, kept)
            if shard:
                train_opts: dict = {"sampler": DistributedSampler(train, seed=d.seed)}
                val_opts: dict = {"sampler": DistributedSampler(val, shuffle=False)}
            else:
                train_opts = {"shuffle": True, "generator": torch.Generator().manual_seed(d.seed)}
                val_opts = {}
            self._kept_loaders[shard] = (
                DataLoader(
                    train, batch_size=d.batch_size, drop_last=True, num_workers=d.num_workers, **train_opts
                ),
                DataLoader(val, batch_size=val_dl.batch_size, num_workers=d.num_workers, **val_opts),
            )
        return self._kept_loaders[shard]

    def example(self) -> torch.Tensor:
        """One validation image ``(1, C, H, W)``."""
        x = next(iter(self.loaders()[1]))[0][:1]
        if x.shape[1] != self.recipe.model.in_channels:
            raise ConfigError(
                f"The data has {x.shape[1]} channels but model.in_channels is "
                f"{self.recipe.model.in_channels}: set model.in_channels={x.shape[1]}."
            )
        return x

    def base_model(self, *, weights: bool = True) -> nn.Module:
        """The recipe's model (with its weights file unless ``weights=False``)."""
        m = self.recipe.model
        return ic.models.create(
            m.name,
            num_classes=self.recipe.data.num_classes,
            in_channels=m.in_channels,
            small_input=m.small_input,
            weights=m.weights if weights else None,
        )

    def icnn_spec(self, model: nn.Module) -> dict | None:
        """``{"layers", "num_classes", "options"}`` for ``attach_icnn``, or ``None`` without the loss."""
        c = self.recipe.icnn
        if not c.enabled:
            return None
        layers = ic.icnn.top_layers(model, 1) if c.layers == "auto" else list(c.layers)
        options = dataclasses.asdict(c.options())
        return {"layers": layers, "num_classes": self.recipe.data.num_classes, "options": options}

    def teacher(self, stage: str) -> str:
        """The model the ``"prune"`` stage's classifier refit or the ``"recover"`` stage's
        distillation imitates, ``"finetuned"`` or ``"base"`` (``prune.refit_teacher`` /
        ``recover.teacher``). ``auto`` is the base model when the fine-tune trained with the filter
        loss and ``model.weights`` is a whole model (a torchvision / timm pretrained name whose
        classifier was left at its initialisation is not), else the fine-tuned model."""
        r = self.recipe
        choice = {"prune": r.prune.refit_teacher, "recover": r.recover.teacher}[stage]
        loss = r.icnn.enabled and r.finetune.epochs > r.icnn.unmask_epochs
        trained = r.model.weights is not None
        if choice == "auto" and loss and trained:  # the base model is built only when it decides
            trained = not self.base_left_at_init()
        return resolve_teacher(choice, loss_finetune=loss, has_weights=trained)

    def base_left_at_init(self) -> list[str]:
        """The tensors of the base model that ``model.weights`` did not provide (a pretrained
        backbone's new classifier, say); empty when the weights are a whole model. Builds the base
        model once."""
        if self._base_skipped is None:
            model = self.base_model()
            self._base_skipped = list(getattr(model, "icnn_skipped_weights", []))
        return self._base_skipped

    def load_finetuned(self, path: Path) -> tuple[nn.Module, dict | None]:
        """The fine-tuned model (ICNN masks frozen in) from the fine-tune stage's ``model.pt``."""
        from icnn_compress._artefact import load_artefact

        model = self.base_model(weights=False)
        spec = self.icnn_spec(model)
        if spec:
            ic.attach_icnn(model, spec["layers"], spec["num_classes"], **spec["options"]).freeze()
        record = load_artefact(path, kind="finetuned-model", what="Fine-tuned model")
        model.load_state_dict(record["state_dict"])
        return model.eval(), spec

    # ----- checks -----
    def check_names(self) -> None:
        """The dataset, model and criterion names exist (registry lookups only: no data is read and
        no model is built). Raises ``ConfigError`` naming the key and the names available."""
        r = self.recipe
        if r.data.name not in ic.data.list_datasets():
            known = ", ".join(ic.data.list_datasets())
            raise ConfigError(f"data.name: unknown dataset {r.data.name!r}; available: {known}.")
        if r.model.name not in ic.models.list_models() and not r.model.name.startswith("timm:"):
            known = ", ".join(ic.models.list_models())
            raise ConfigError(
                f"model.name: unknown model {r.model.name!r}; available: {known}, or 'timm:<name>'."
            )
        from icnn_compress.prune import list_criteria

        if r.prune.criterion not in list_criteria():
            raise ConfigError(
                f"prune.criterion: unknown criterion {r.prune.criterion!r}; available: "
                f"{', '.join(list_criteria())}."
            )
        self._check_criterion_options()

    def _check_criterion_options(self) -> None:
        """``prune.criterion_options`` are options the criterion takes, with values it accepts
        (its importance object is built, which reads no data)."""
        from icnn_compress.prune import make_importance

        p = self.recipe.prune
        if not p.criterion_options:
            return
        if p.criterion == "icnn-cluster" and "distance_threshold" in p.criterion_options:
            raise ConfigError(
                "prune.criterion_options: set icnn-cluster's distance_threshold as "
                "analysis.distance_threshold (the report's clusters and pruning's are the same)."
            )
        try:
            make_importance(p.criterion, **p.criterion_options)
        except ConfigError as e:
            raise ConfigError(f"prune.criterion_options: {e}") from None

    def check(self, *, training: bool = True) -> None:
        """Resolve every name and size the recipe uses, reading but never writing: dataset, model
        (built on the meta device), ICNN layers, criterion, ignored layers, weights file, device,
        and that a training epoch has at least one batch. Raises ``ConfigError``/``DataError``."""
        r = self.recipe
        if r.finetune.tensorboard and training:
            from icnn_compress.train import tensorboard_available

            if not tensorboard_available():
                raise ConfigError(
                    "finetune.tensorboard: true needs the 'tensorboard' package: pip install "
                    "'icnn-compress[tensorboard]', or set finetune.tensorboard=false."
                )
        self.check_names()
        if r.model.weights is not None:
            w = Path(r.model.weights)
            looks_like_path = w.suffix in (".pt", ".pth", ".bin", ".safetensors") or "/" in r.model.weights
            if looks_like_path and not w.is_file():
                raise ConfigError(f"model.weights: file {r.model.weights!r} does not exist.")
        try:
            with torch.device("meta"):
                model = self.base_model(weights=False)
        except IcnnCompressError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"model: {r.model.name!r} cannot be built with these settings ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})."
            ) from None
        self._check_layers(model)
        self._check_teachers()
        if r.icnn.enabled and r.icnn.unmask_epochs > r.finetune.epochs:
            raise ConfigError(
                f"icnn.unmask_epochs ({r.icnn.unmask_epochs}) must be at most finetune.epochs "
                f"({r.finetune.epochs})."
            )
        train_dl, _ = self.loaders()
        if training and (r.finetune.epochs > 0 or r.recover.epochs > 0) and len(train_dl) == 0:
            raise ConfigError(
                f"data: {len(train_dl.dataset)} training items give no full batch of data.batch_size="
                f"{r.data.batch_size}; lower the batch size or use more items."
            )

    def _check_teachers(self) -> None:
        """A teacher named ``base`` must be a trained model: ``model.weights`` set, and providing
        every tensor of the model."""
        r = self.recipe
        teachers = (
            (
                "prune.refit_teacher",
                r.prune.refit_teacher,
                r.prune.refit_classifier is not False,
                "refits to",
            ),
            (
                "recover.teacher",
                r.recover.teacher,
                r.recover.epochs > 0 and r.recover.distill.enabled,
                "distils from",
            ),
        )
        for key, choice, used, what in teachers:
            if choice != "base" or not used:
                continue
            if r.model.weights is None:
                raise ConfigError(
                    f"{key}: 'base' {what} the model the fine-tune started from, but model.weights is not "
                    "set (a randomly initialised model); use 'finetuned' or 'auto'."
                )
            left = self.base_left_at_init()
            if left:
                names = ", ".join(left[:3]) + (", ..." if len(left) > 3 else "")
                raise ConfigError(
                    f"{key}: 'base', but model.weights ({r.model.weights!r}) leaves {len(left)} tensors of "
                    f"the model at their initialisation ({names}): it cannot teach; use 'finetuned' or "
                    "'auto'."
                )

    def _check_layers(self, model: nn.Module) -> None:
        r = self.recipe
        names = dict(model.named_modules())
        spec = None
        if r.icnn.enabled:
            if r.icnn.layers != "auto":
                for layer in r.icnn.layers:
                    if layer not in names:
                        raise ConfigError(_unknown("icnn.layers", layer, names))
            spec = self.icnn_spec(model)
            handle = ic.attach_icnn(model, spec["layers"], spec["num_classes"], **spec["options"])
            handle.remove()
        for layer in r.prune.ignored_layers:
            if layer not in names:
                raise ConfigError(_unknown("prune.ignored_layers", layer, names))
        kept = r.prune.keep_classes
        if kept is not None:
            k = r.data.num_classes
            if len(set(kept)) != len(kept) or max(kept) >= k:
                raise ConfigError(
                    f"prune.keep_classes: {kept} must be distinct class indices in 0..{k - 1} "
                    f"(data.num_classes is {k})."
                )


def _unknown(key: str, name: str, names: dict) -> str:
    import difflib

    convs = [n for n, m in names.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
    close = difflib.get_close_matches(name, list(names), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    shown = ", ".join(convs[-6:])
    return f"{key}: the model has no layer {name!r}.{hint} Its last conv/linear layers: {shown}."
