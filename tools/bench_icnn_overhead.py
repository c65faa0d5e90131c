"""Training-step time with and without the interpretable filter loss.

vgg_small (~1M parameters), Fashion-MNIST-sized input (1x28x28), batch 64, SGD, the loss and masks
on the top conv layer (``layers="auto"``, the default of ``attach_icnn`` and the recipes) and, for
comparison, on the top two. Steps without the loss and with each are interleaved in one process
after a warm-up; the medians are compared. Writes tools/results/icnn_overhead.json
(``summary.step_ratio``: the default; ``summary.step_ratio_top2``; on CUDA
``summary.host_syncs_per_step``, counted with ``torch.cuda.set_sync_debug_mode``).

    .venv/bin/python tools/bench_icnn_overhead.py [--threads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from icnn_compress import attach_icnn, icnn, models
from icnn_compress.io import atomic_write_json, environment_info


def make(device: str, top: int, seed: int):
    """Model, ICNN handle (None when ``top`` is 0), optimiser and the layers with the loss."""
    torch.manual_seed(seed)
    model = models.create("vgg_small", num_classes=10, in_channels=1).to(device)
    convs = icnn.top_layers(model, top) if top else []
    handle = attach_icnn(model, convs, num_classes=10, warmup_steps=0) if top else None
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, handle, opt, convs


def train_step(model, handle, opt, x, y) -> None:
    """One SGD step: cross-entropy, plus the filter loss when ``handle`` is given."""
    loss = F.cross_entropy(model(x), y)
    if handle is not None:
        loss = loss + handle.loss(y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def step(model, handle, opt, x, y, device):
    t0 = time.perf_counter()
    train_step(model, handle, opt, x, y)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def host_syncs(runs: dict, x, y, device: str, steps: int = 5) -> dict[str, float] | None:
    """Host synchronisations per training step (CUDA only; ``torch.cuda.set_sync_debug_mode``
    warns on every op that waits for the device), for each entry of ``runs``."""
    if device != "cuda":
        return None
    out = {}
    for key, (model, handle, opt, _) in runs.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    train_step(model, handle, opt, x, y)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out[key] = sum("synchroniz" in str(w.message) for w in caught) / steps
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "icnn_overhead.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(a.seed)
    x = torch.rand(a.batch, 1, 28, 28, generator=g).to(a.device)
    y = torch.randint(0, 10, (a.batch,), generator=g).to(a.device)
    runs = {
        "without": make(a.device, 0, a.seed),
        "with": make(a.device, 1, a.seed),
        "top2": make(a.device, 2, a.seed),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(a.warmup + a.repeats):
        for key, (model, handle, opt, _) in runs.items():
            t = step(model, handle, opt, x, y, a.device)
            if i >= a.warmup:
                times[key].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    syncs = host_syncs(runs, x, y, a.device)
    result = {
        "benchmark": "icnn_overhead",
        "command": f"python tools/bench_icnn_overhead.py --threads {a.threads} --device {a.device}",
        "environment": environment_info(),
        "setup": {
            "model": "vgg_small",
            "params": sum(p.numel() for p in runs["without"][0].parameters()),
            "input": [a.batch, 1, 28, 28],
            "icnn_layers": runs["with"][3],
            "icnn_layers_top2": runs["top2"][3],
            "device": a.device,
            "threads": a.threads,
            "warmup_steps": a.warmup,
            "repeats": a.repeats,
            "seed": a.seed,
        },
        "step_seconds": {k: {"median": med[k], "min": min(v), "max": max(v)} for k, v in times.items()},
        "summary": {
            "step_ratio": med["with"] / med["without"],
            "step_ratio_top2": med["top2"] / med["without"],
            "target": "<= 1.15" if a.device == "cuda" else "<= 1.10",
            "host_syncs_per_step": syncs,
        },
    }
    atomic_write_json(result, a.out)
    print(
        f"median step without {med['without'] * 1e3:.1f} ms, with (top layer) {med['with'] * 1e3:.1f} ms, "
        f"ratio {result['summary']['step_ratio']:.3f}; top two {result['summary']['step_ratio_top2']:.3f} "
        f"-> {a.out}"
    )
    if syncs is not None:
        print(f"host synchronisations per step: {syncs}")


if __name__ == "__main__":
    main()
