"""Helpers shared by the benchmark scripts in tools/ (importable because a script's folder is on sys.path)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader, RandomSampler, Subset


def baseline_path(model: str, epochs: int, train_size: int | None = None, seed: int = 0) -> Path:
    """Where tools/bench_fashion.py caches the weights of a Fashion-MNIST baseline (trained with
    ``seed``; seed 0 keeps the name it always had)."""
    sub = f"_n{train_size}" if train_size else ""
    sub += f"_s{seed}" if seed else ""
    return Path(f"runs/baselines/{model}_fashion_e{epochs}{sub}.pt")


@torch.no_grad()
def top1(model: torch.nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy (0..1) of ``model`` in eval mode on every batch of ``loader`` (PyTorch)."""
    model.eval()
    device = next(model.parameters()).device
    correct = seen = 0
    for x, y, *_ in loader:
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
        seen += len(y)
    return correct / seen


def first_n_loader(loader: DataLoader, n: int, batch_size: int, seed: int) -> DataLoader:
    """A shuffled (seeded), drop-last loader over the first ``n`` items of ``loader``'s dataset."""
    return DataLoader(
        Subset(loader.dataset, range(min(n, len(loader.dataset)))),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def command_line(script: str, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> str:
    """The command that reproduces a run: ``python tools/<script>`` with every option set in
    ``args`` (unset ``None``/``False`` options and the names in ``skip`` left out)."""
    parts = [f"python tools/{script}"]
    for k, v in vars(args).items():
        if k in skip or v is None or v is False:
            continue
        parts.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}"))
    return " ".join(parts)


def parse_options(text: str, sep: str = ";") -> dict:
    """``"key=value;key=value"`` -> a dict; ``true``/``false`` become booleans, numbers floats."""
    options: dict = {}
    for item in filter(None, text.split(sep)):
        key, _, value = item.partition("=")
        low = value.lower()
        if low in ("true", "false"):
            options[key] = low == "true"
            continue
        try:
            options[key] = float(value)
        except ValueError:
            options[key] = value
    return options


def params_below(model: torch.nn.Module, layer: str) -> list[torch.nn.Parameter]:
    """Parameters of the modules defined before ``layer`` (the stem and the blocks under it; not
    ``layer``, what follows it, or the classifier)."""
    params, seen = [], set()
    for name, module in model.named_modules():
        if name == layer or name.startswith(layer + "."):
            break
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def synthetic_part(seed: int) -> str:
    """The key part of bench_icnn_cost's rows for the synthetic-parts base with data and training
    seed ``seed``: ``synthetic`` for 0, ``synthetic-s<seed>`` otherwise (``synthetic_seed`` inverts it)."""
    return "synthetic" if seed == 0 else f"synthetic-s{seed}"


def synthetic_seed(part: str) -> int:
    """The seed of a rows' key part written by ``synthetic_part``."""
    return 0 if part == "synthetic" else int(part.removeprefix("synthetic-s"))


def log_to_stdout() -> None:
    """Show the package's INFO lines on stdout with the time (one line per training epoch, the
    refit, the latency plans...), so that a benchmark running in the background says where it is.
    Does nothing when the caller has configured the ``icnn_compress`` logger already."""
    log = logging.getLogger("icnn_compress")
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold the lock file ``lock_path`` inside the block, so that two runs never write the same cache.

    A second run that finds it held stops at once with one line naming the lock (the first run's
    files are left as they are); the lock is released when the block ends, even on an error.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise SystemExit(
            f"another run is writing this cache (lock {lock_path} is held): wait for it to finish, "
            "or give this run another --cache"
        ) from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def frozen(params) -> Iterator[None]:
    """``params`` do not train inside the block (``requires_grad`` off, then on again)."""
    params = list(params or ())
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def load_fashion_model(model_name: str, weights: str, *, icnn: bool = False) -> torch.nn.Module:
    """A Fashion-MNIST benchmark model (10 classes, 1 channel) from a state dict, in eval mode.
    ``icnn``: the state dict is of a model fine-tuned with the loss and saved with its mask layers
    frozen in (bench_criteria.py's ``*_icnn.pt``): the masks are attached, switched off and frozen
    so that the keys fit."""
    import icnn_compress as ic

    if not icnn:
        return ic.models.create(model_name, num_classes=10, in_channels=1, weights=weights).eval()
    model = ic.models.create(model_name, num_classes=10, in_channels=1)
    handle = ic.attach_icnn(model, "auto", num_classes=10)
    handle.set_masks(False)
    handle.freeze()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def probe_batches(dataset, seed: int, batches: int = 20, batch_size: int = 64) -> list:
    """The probe of the pruning tools: ``batches`` batches of ``batch_size`` images drawn at random
    (with replacement across batches, generator seed ``1000 + seed``), read once into a list so
    that every pass over it sees the same images."""
    g = torch.Generator().manual_seed(1000 + seed)
    sampler = RandomSampler(dataset, num_samples=batches * batch_size, generator=g)
    return list(DataLoader(dataset, batch_size=batch_size, sampler=sampler))


def fashion_width_data(eval_size: int) -> tuple[DataLoader, DataLoader, list]:
    """The width-rule benchmarks' Fashion-MNIST data: the training loader (batch 64, augmented),
    the first ``eval_size`` test images (batches of 500) and 20 fixed probe batches of 64
    un-augmented training images (the same for every prune; a sampler would draw new ones)."""
    import icnn_compress as ic

    train_dl, test_dl = ic.data.loaders("fashion-mnist", batch_size=64, val_batch_size=500)
    eval_dl = DataLoader(Subset(test_dl.dataset, range(eval_size)), batch_size=500)
    plain = ic.data.loaders("fashion-mnist", batch_size=64, augment=False)[0].dataset
    g = torch.Generator().manual_seed(0)
    probe = list(
        DataLoader(plain, batch_size=64, sampler=RandomSampler(plain, num_samples=64 * 20, generator=g))
    )
    return train_dl, eval_dl, probe


def conv_widths(model: torch.nn.Module) -> dict[str, int]:
    """``{conv name: output channels}`` of every Conv2d in ``model``."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
