"""The fine-tune loop: task loss + an optional extra loss (the ICNN handle's), checkpoints, resume."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from icnn_compress import _dist
from icnn_compress._artefact import ARTEFACT_KEY, load_artefact, save_artefact
from icnn_compress._progress import progress_bar
from icnn_compress.errors import ConfigError, DataError, TrainingError
from icnn_compress.train._distill import Distillation, distillation_loss, teacher_logits

SYNC_EVERY = 25  # training steps between the host's reads of the device (guard, progress bar)

__all__ = ["CHECKPOINT_KIND", "Callback", "Trainer"]

log = logging.getLogger(__name__)
CHECKPOINT_KIND = "trainer-checkpoint"

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "loglinear", "constant")


class Callback:
    """Base class of Trainer callbacks; every hook is optional (dispatched with ``getattr``)."""

    def on_fit_start(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None: ...
    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None: ...
    def on_checkpoint(self, trainer: Trainer, state: dict) -> None: ...
    def on_fit_end(self, trainer: Trainer) -> None: ...


def _lr_factor(
    schedule: str, progress: float, *, lr: float, lr_end: float, step_every: float, gamma: float
) -> float:
    """Multiplier of the base lr at ``progress`` in [0, 1] of the run."""
    if schedule == "cosine":
        return (lr_end + (lr - lr_end) * 0.5 * (1 + math.cos(math.pi * progress))) / lr
    if schedule == "loglinear":  # the paper: log-linear from lr to lr_end
        return math.exp(math.log(lr_end / lr) * progress)
    if schedule == "step":
        return gamma ** math.floor(progress / step_every) if step_every > 0 else 1.0
    return 1.0


class Trainer:
    """Fine-tune ``model`` on ``train_loader`` with cross-entropy plus an optional extra loss.

    Args:
        model: the network (moved to ``device``; wrapped in DistributedDataParallel when a process
            group is initialised, e.g. under ``torchrun``).
        train_loader, val_loader: batches of ``(images, labels, ...)``; extra items are ignored.
        epochs: number of epochs.
        extra_loss: ``fn(targets) -> scalar`` added to the task loss each step, e.g.
            ``handle.loss`` of ``attach_icnn``. If it is a bound method of an object with
            ``state_dict``/``load_state_dict``/``set_epoch`` (the ICNN handle), that state is
            checkpointed and the epoch is passed on.
        optimizer: ``"sgd"`` (momentum) or ``"adamw"``; lr, momentum, weight_decay as usual.
        schedule: ``"cosine"``, ``"step"`` (x``gamma`` every ``step_epochs``), ``"loglinear"``
            (lr -> lr_end, the paper's) or ``"constant"``; updated every step.
        clip_grad_norm: max global gradient norm (``None``: no clipping).
        amp: mixed precision (bfloat16/float16 autocast); ``None`` = on for CUDA, off on CPU.
        out_dir: where ``checkpoints/last.pt`` (atomic, each epoch) and ``metrics.jsonl`` go;
            ``None`` keeps nothing on disk.
        resume: continue from ``out_dir/checkpoints/last.pt`` when it exists.
        callbacks: objects with any of the ``Callback`` hooks.
        device: ``"cpu"``, ``"cuda"``, ...; ``None`` = CUDA when available.
        seed: seeds torch/numpy/random at the start of ``fit`` (not on resume: RNG state is restored).
        progress: tqdm progress bars (rank 0 only, and only when stderr is a terminal).
        run_key: what this training is (e.g. a hash of its settings and inputs), stored in every
            checkpoint. On resume a checkpoint with another key, a failed checksum or a shape that
            does not fit is set aside (renamed ``last.pt.stale-N``, with a warning), never loaded.
        distill: a ``Distillation`` (frozen teacher, weight, temperature): the task loss becomes
            ``(1 - w) * CE + w * T**2 * KL(teacher || student)``; ``None`` or weight 0: plain CE.
        channels_last: run the training and evaluation passes with the 4-D weights and images in
            the channels-last memory format (NHWC), which oneDNN's CPU convolutions prefer (an
            epoch of vgg_small / resnet_cifar20 8-31% shorter on a 2-core AVX2 CPU,
            tools/bench_channels_last.py); the model is back in the default format between
            epochs and after ``fit``, so checkpoints, callbacks and pruning see the usual
            tensors. A model that fails its first channels-last pass (``x.view(n, -1)`` on a map
            larger than 1x1) trains in the default format instead, with a warning, as if it had
            from the start. ``None`` = on for a model with a Conv2d on the CPU without a process
            group, off otherwise (CUDA and DDP as before).

    Example:
        >>> icnn = attach_icnn(model, "auto", num_classes=10)
        >>> Trainer(model, train_dl, val_dl, extra_loss=icnn.loss, epochs=3).fit()
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: DataLoader,
        val_loader: DataLoader | None = None,
        *,
        epochs: int = 1,
        extra_loss: Callable[[Tensor], Tensor] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        schedule: str = "cosine",
        lr_end: float = 0.0,
        step_epochs: int = 30,
        gamma: float = 0.1,
        clip_grad_norm: float | None = None,
        amp: bool | None = None,
        out_dir: str | Path | None = None,
        resume: bool = False,
        callbacks: Sequence[Any] = (),
        device: str | torch.device | None = None,
        seed: int = 0,
        progress: bool = True,
        run_key: str | None = None,
        distill: Distillation | None = None,
        channels_last: bool | None = None,
    ) -> None:
        if optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"The 'optimizer' parameter of Trainer must be one of {OPTIMIZERS}. Got {optimizer!r}."
            )
        if schedule not in SCHEDULES:
            raise ConfigError(
                f"The 'schedule' parameter of Trainer must be one of {SCHEDULES}. Got {schedule!r}."
            )
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(
                f"The 'epochs' parameter of Trainer must be an int >= 1. Got {epochs!r} instead."
            )
        if not lr > 0:
            raise ConfigError(f"The 'lr' parameter of Trainer must be a float > 0. Got {lr!r} instead.")
        if schedule == "loglinear" and not lr_end > 0:
            raise ConfigError("schedule='loglinear' needs lr_end > 0 (the paper: lr 1e-4 -> lr_end 1e-5).")
        if resume and out_dir is None:
            raise ConfigError("resume=True needs out_dir (where the checkpoint is).")
        if hasattr(train_loader, "__len__") and len(train_loader) == 0:
            raise DataError(
                "The training loader yields no batches (fewer items than one batch with drop_last?): "
                "there is nothing to train on."
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.epochs, self.extra_loss = epochs, extra_loss
        owner = getattr(extra_loss, "__self__", None)
        self._extra_state = (
            owner if all(hasattr(owner, a) for a in ("state_dict", "load_state_dict")) else None
        )
        self.lr, self.lr_end, self.schedule = lr, lr_end, schedule
        self.step_epochs, self.gamma = step_epochs, gamma
        self.clip_grad_norm = clip_grad_norm
        self.amp = (self.device.type == "cuda") if amp is None else bool(amp)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.resume, self.callbacks, self.seed = resume, list(callbacks), seed
        self.run_key = run_key
        if distill is not None and not isinstance(distill, Distillation):
            raise ConfigError(f"distill must be a Distillation or None. Got {type(distill).__name__}.")
        self.distill = distill if distill is not None and distill.weight > 0 else None
        if self.distill is not None:
            self.distill.teacher.to(self.device).eval()
        if channels_last is None:
            channels_last = (
                self.device.type == "cpu"
                and not _dist.is_distributed()
                and any(isinstance(m, nn.Conv2d) for m in self.model.modules())
            )
        self.channels_last, self._nhwc, self._format_checked = bool(channels_last), False, False
        self._teacher_checked, self._teacher_nhwc = False, True  # the teacher's own trial
        self.progress = progress and _dist.rank() == 0
        self._opt = (optimizer, momentum, weight_decay)
        self.rebuild_optimizer()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.device.type == "cuda")
        self.net: nn.Module = self.model
        if _dist.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.history: list[dict] = []

    def rebuild_optimizer(self) -> None:
        """A fresh optimizer over the model's current parameters (after pruning replaced them)."""
        kind, momentum, weight_decay = self._opt
        params = [p for p in self.model.parameters() if p.requires_grad]
        if kind == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=self.lr, momentum=momentum, weight_decay=weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=weight_decay)
        if hasattr(self, "net") and _dist.is_distributed():  # re-wrap: DDP holds the old parameters
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    # ----- helpers -----
    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    def _raise_if_not_finite(self, first_bad: Tensor, bad_values: Tensor, epoch: int) -> None:
        """Stop with ``TrainingError`` if a step of this epoch had a non-finite loss (reads the
        device: called every ``SYNC_EVERY`` steps; every rank stops together under DDP)."""
        flag = _dist.all_reduce_((first_bad >= 0).to(torch.float32).reshape(1), "max")
        if not bool(flag):
            return
        step = int(first_bad)
        loss, task, extra = bad_values.tolist()
        where = f"epoch {epoch + 1}, step {step}" if step >= 0 else f"epoch {epoch + 1} (on another rank)"
        ckpt = self.checkpoint_path if (self.checkpoint_path and self.checkpoint_path.is_file()) else None
        raise TrainingError(
            f"The loss became {loss} at {where} (task {task:.4g}, extra {extra:.4g}). Training stopped; "
            + (f"the last good checkpoint is {ckpt}. " if ckpt else "no checkpoint was written yet. ")
            + "Lower lr, set clip_grad_norm, or lower the extra loss weight."
        )

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoints" / "last.pt" if self.out_dir is not None else None

    def _steps_total(self) -> int:
        return max(1, self.epochs * len(self.train_loader))

    def _set_lr(self) -> float:
        progress = self.global_step / self._steps_total()
        f = _lr_factor(
            self.schedule,
            progress,
            lr=self.lr,
            lr_end=self.lr_end,
            step_every=self.step_epochs / self.epochs,
            gamma=self.gamma,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * f
        return self.lr * f

    def state_dict(self) -> dict:
        """Everything a resume needs: weights, optimizer, counters, RNG states, extra-loss state."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "history": json.dumps(self.history),
            "rng": {
                "torch": torch.random.get_rng_state(),
                "numpy": json.dumps(_np_state_to_list(np.random.get_state())),
                "python": json.dumps(_py_state_to_list(random.getstate())),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "loader": self._loader_generator_state(),
            },
        }
        if self._extra_state is not None:
            state["extra"] = self._extra_state.state_dict()
        return state

    def _loader_generator_state(self):
        gen = getattr(self.train_loader, "generator", None)
        return gen.get_state() if gen is not None else torch.empty(0, dtype=torch.uint8)

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.history = json.loads(state["history"])
        rng = state["rng"]
        torch.random.set_rng_state(rng["torch"])
        np.random.set_state(_np_state_from_list(json.loads(rng["numpy"])))
        random.setstate(_py_state_from_list(json.loads(rng["python"])))
        if torch.cuda.is_available() and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        gen = getattr(self.train_loader, "generator", None)
        if gen is not None and rng["loader"].numel():
            gen.set_state(rng["loader"])
        if self._extra_state is not None and "extra" in state:
            self._extra_state.load_state_dict(state["extra"])

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is None or _dist.rank() != 0:
            return
        state = self.state_dict()
        self._call("on_checkpoint", state)
        save_artefact(state, self.checkpoint_path, kind=CHECKPOINT_KIND, run_key=self.run_key)

    def _resume_from_checkpoint(self) -> bool:
        """Load ``last.pt`` when it is intact and belongs to this run; else set it aside."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        try:
            record = load_artefact(path, kind=CHECKPOINT_KIND, what="Checkpoint", map_location=self.device)
            key = record[ARTEFACT_KEY].get("run_key")
            if key != self.run_key:
                raise DataError(f"it belongs to another run (key {key!r}, not {self.run_key!r})")
            state = {k: v for k, v in record.items() if k != ARTEFACT_KEY}
            self.load_state_dict(state)
            return True
        except (DataError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            aside = _set_aside(path)
            log.warning(
                "Not resuming from %s (%s); set aside as %s, training from the start.",
                path,
                str(exc).splitlines()[0],
                aside.name,
            )
            return False

    def _log(self, record: dict) -> None:
        if self.out_dir is None or _dist.rank() != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ----- the loop -----
    @contextmanager
    def _memory_format(self) -> Iterator[None]:
        """The model (and the teacher) in channels-last inside the block when ``channels_last``;
        back in the default format after the outermost block, whatever happens. Parameters keep
        their identity (``Module.to`` replaces their data), so the optimizer still holds them."""
        if not self.channels_last or self._nhwc:
            yield
            return
        modules = [self.model]
        if self.distill is not None and self._teacher_nhwc:
            modules.append(self.distill.teacher)
        for m in modules:
            m.to(memory_format=torch.channels_last)
        self._nhwc = True
        try:
            yield
        finally:
            self._nhwc = False
            for m in modules:
                m.to(memory_format=torch.contiguous_format)

    def _forward(self, net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(net(x), x)``. The first channels-last pass is a trial: a model that cannot run
        channels-last (say, ``x.view(n, -1)`` on a map larger than 1x1) raises there; then its
        BatchNorm statistics and the RNG are put back as they were before the pass, the passes
        go back to the default format for good (a warning says why), and the batch runs again,
        so the run is the one the default format would have given."""
        if not self.channels_last or self._format_checked:
            return net(x), x
        buffers = [b.detach().clone() for b in self.model.buffers()]
        rng = torch.get_rng_state()
        try:
            out = net(x)
        except RuntimeError as exc:
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers, strict=True):
                    b.copy_(saved)
            torch.set_rng_state(rng)
            self.channels_last = False
            modules = [self.model] + ([self.distill.teacher] if self.distill is not None else [])
            for m in modules:
                m.to(memory_format=torch.contiguous_format)
            x = x.contiguous()
            out = net(x)  # an error that is not about the format raises here, as it would have
            log.warning(
                "this model cannot train channels-last (%s); using the default memory format",
                _first_line(exc),
            )
        self._format_checked = True
        return out, x

    def _teacher_logits(self, x: Tensor) -> Tensor:
        """The teacher's logits for ``x``. Its first channels-last pass is a trial too (eval mode,
        no autograd: nothing to put back); a teacher that fails it goes back to the default format."""
        teacher = self.distill.teacher
        if not self._teacher_checked and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            try:
                logits = teacher_logits(teacher, x)
            except RuntimeError as exc:
                teacher.to(memory_format=torch.contiguous_format)
                self._teacher_nhwc = False
                logits = teacher_logits(teacher, x.contiguous())
                log.warning(
                    "the teacher cannot run channels-last (%s); it runs in the default memory format",
                    _first_line(exc),
                )
            self._teacher_checked = True
            return logits
        return teacher_logits(teacher, x if self._teacher_nhwc else x.contiguous())

    def _inputs(self, x: Tensor) -> Tensor:
        """A batch of images on the device, channels-last when the passes are."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def fit(self) -> Trainer:
        """Train for the remaining epochs; returns ``self`` (metrics in ``history``)."""
        resumed = self.resume and self._resume_from_checkpoint()
        if not resumed and self.epoch == 0:
            torch.manual_seed(self.seed)
            np.random.seed(self.seed)
            random.seed(self.seed)
        self._call("on_fit_start")
        while self.epoch < self.epochs:
            with self._memory_format():
                metrics = self.train_epoch(self.epoch)
                if self.val_loader is not None:
                    metrics.update(self.evaluate())
            self.epoch += 1
            self.history.append(metrics)
            self._log(metrics)
            if _dist.rank() == 0:
                log.info(_epoch_line(metrics, self.epochs, self.extra_loss is not None))
            self.save_checkpoint()
            self._call("on_epoch_end", self.epoch - 1, metrics)
        self._call("on_fit_end")
        return self

    def train_epoch(self, epoch: int) -> dict:
        """One epoch over the training loader; returns its metrics (loss, accuracy, steps...)."""
        with self._memory_format():
            return self._train_epoch(epoch)

    def _train_epoch(self, epoch: int) -> dict:
        self.net.train()
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if self._extra_state is not None and hasattr(self._extra_state, "set_epoch"):
            self._extra_state.set_epoch(epoch)
        t0, first_step = time.perf_counter(), self.global_step
        # the running sums, the non-finite guard and the progress bar live on the device and are
        # read every SYNC_EVERY steps: the host never waits for the device inside a step
        dev = self.device
        sums = torch.zeros(3, dtype=torch.float64, device=dev)  # sum of task loss, extra loss, correct
        seen = 0.0
        first_bad = torch.full((), -1, dtype=torch.long, device=dev)  # first step with a non-finite loss
        bad_values = torch.zeros(3, dtype=torch.float64, device=dev)  # its loss, task and extra loss
        step_hooks = any(getattr(cb, "on_step_end", None) is not None for cb in self.callbacks)
        bar = progress_bar(
            self.train_loader, progress=self.progress, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False
        )
        lr = self.lr
        for i, batch in enumerate(bar):
            x, y = self._inputs(batch[0]), batch[1].to(dev, non_blocking=True)
            lr = self._set_lr()
            with torch.autocast(dev.type, dtype=_amp_dtype(dev), enabled=self.amp):
                out, x = self._forward(self.net, x)
                task = F.cross_entropy(out, y)
                if self.distill is not None:
                    soft = distillation_loss(out, self._teacher_logits(x), self.distill.temperature)
                    task = (1 - self.distill.weight) * task + self.distill.weight * soft
                extra = self.extra_loss(y) if self.extra_loss is not None else None
                loss = task + extra if extra is not None else task
            values = torch.stack(
                [
                    loss.detach().double(),
                    task.detach().double(),
                    extra.detach().double()
                    if extra is not None
                    else torch.zeros((), dtype=torch.float64, device=dev),
                ]
            )
            new_bad = (first_bad < 0) & ~torch.isfinite(values[0])
            first_bad = torch.where(new_bad, torch.full_like(first_bad, self.global_step), first_bad)
            bad_values = torch.where(new_bad, values, bad_values)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.clip_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.global_step += 1
            n = float(y.numel())
            sums += torch.stack([values[1] * n, values[2] * n, (out.detach().argmax(1) == y).sum().double()])
            seen += n
            if step_hooks:  # a callback that wants every step's loss pays for reading it
                self._call("on_step_end", self.global_step, float(values[0]))
            if (i + 1) % SYNC_EVERY == 0:  # (the epoch's last steps are checked after the loop)
                self._raise_if_not_finite(first_bad, bad_values, epoch)
                bar.set_postfix(loss=f"{float(values[1]):.3f}", lr=f"{lr:.2e}")
        self._raise_if_not_finite(first_bad, bad_values, epoch)
        packed = _dist.all_reduce_(torch.cat([sums, sums.new_tensor([seen])]))
        total = dict(zip(("loss", "extra_loss", "correct", "seen"), packed.tolist()))
        seen = max(total["seen"], 1.0)
        return {
            "epoch": epoch + 1,
            "train_loss": total["loss"] / seen,
            "train_extra_loss": total["extra_loss"] / seen,
            "train_acc": total["correct"] / seen,
            "steps": self.global_step - first_step,  # optimizer steps (each rank takes as many)
            "images": int(total["seen"]),  # training images seen, all ranks together
            "lr": lr,
            "seconds": time.perf_counter() - t0,
        }

    @torch.no_grad()
    def evaluate(self, loader: DataLoader | None = None) -> dict:
        """Top-1 accuracy and mean cross-entropy on ``loader`` (default: the validation loader)."""
        loader = loader or self.val_loader
        with self._memory_format():
            return self._evaluate(loader)

    def _evaluate(self, loader: DataLoader) -> dict:
        self.net.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for batch in progress_bar(loader, progress=self.progress, desc="eval", leave=False):
            x, y = self._inputs(batch[0]), batch[1].to(self.device)
            with torch.autocast(self.device.type, dtype=_amp_dtype(self.device), enabled=self.amp):
                out, x = self._forward(self.model, x)
            sums += torch.stack(
                [
                    F.cross_entropy(out.float(), y, reduction="sum").double(),
                    (out.argmax(1) == y).sum().double(),
                    torch.full((), float(y.numel()), dtype=torch.float64, device=self.device),
                ]
            )
        loss, correct, seen = _dist.all_reduce_(sums).tolist()
        return {"val_loss": loss / max(seen, 1), "val_acc": correct / max(seen, 1)}


def _epoch_line(metrics: dict, epochs: int, extra: bool) -> str:
    """One log line per epoch, e.g. ``epoch 2/6: train loss 0.412, acc 0.861 | val loss 0.301,
    acc 0.902 | 312 steps in 31.2 s`` (the filter loss too when the model has one)."""
    train = f"train loss {metrics['train_loss']:.4f}, acc {metrics['train_acc']:.4f}"
    if extra:
        train += f", extra loss {metrics['train_extra_loss']:.4f}"
    parts = [f"epoch {metrics['epoch']}/{epochs}: {train}"]
    if "val_acc" in metrics:
        parts.append(f"val loss {metrics['val_loss']:.4f}, acc {metrics['val_acc']:.4f}")
    parts.append(f"{metrics['steps']} steps in {metrics['seconds']:.1f} s")
    return " | ".join(parts)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _set_aside(path: Path) -> Path:
    """Rename ``path`` to the first free ``<name>.stale-N``; returns the new path."""
    n = 1
    while (aside := path.with_name(f"{path.name}.stale-{n}")).exists():
        n += 1
    path.replace(aside)
    return aside


def _amp_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.bfloat16


# numpy / python RNG states as plain lists, so checkpoints load with weights_only=True
def _np_state_to_list(state) -> list:
    return [state[0], state[1].tolist(), *state[2:]]


def _np_state_from_list(state: list):
    return (state[0], np.array(state[1], dtype=np.uint32), *state[2:])


def _py_state_to_list(state) -> list:
    return [state[0], list(state[1]), state[2]]


def _py_state_from_list(state: list):
    return (state[0], tuple(state[1]), state[2])
