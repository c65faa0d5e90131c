"""Training-step time with and without the interpretable filter loss.

By default vgg_small (~1M parameters), Fashion-MNIST-sized input (1x28x28), batch 64 (``--model``,
``--input-size``, ``--in-channels`` and ``--batch`` for a compute-bound step), SGD, the loss and masks
on the top conv layer (``layers="auto"``, the default of ``attach_icnn`` and the recipes) and, for
comparison, on the top two. Steps without the loss and with each are interleaved in one process
after a warm-up; the medians are compared. Writes tools/results/icnn_overhead.json
(``summary.step_ratio``: the default; ``summary.step_ratio_top2``; on CUDA
``summary.host_syncs_per_step``, counted with ``torch.cuda.set_sync_debug_mode``;
``summary.kernels_per_step``: CUDA kernels, or on the CPU the ``aten`` operators, of one step).

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
from _common import command_line
from torch import nn

from icnn_compress import attach_icnn, icnn, models
from icnn_compress.icnn import use_fused
from icnn_compress.io import atomic_write_json, environment_info


def make(device: str, top: int, seed: int, name: str = "vgg_small", in_channels: int = 1, fuse: str = "auto"):
    """Model, ICNN handle (None when ``top`` is 0), optimiser and the layers with the loss."""
    torch.manual_seed(seed)
    model = models.create(name, num_classes=10, in_channels=in_channels).to(device)
    convs = icnn.top_layers(model, top) if top else []
    handle = attach_icnn(model, convs, num_classes=10, warmup_steps=0, fuse=fuse) if top else None
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, handle, opt, convs


PARTS = ("forward", "loss", "backward", "optimiser")


def train_step(model, handle, opt, x, y, marks: list[float] | None = None) -> None:
    """One SGD step: cross-entropy, plus the filter loss when ``handle`` is given. ``marks``, when
    given, receives ``time.perf_counter()`` before the step and after each of ``PARTS``."""
    mark = marks.append if marks is not None else (lambda _t: None)
    mark(time.perf_counter())
    loss = F.cross_entropy(model(x), y)
    mark(time.perf_counter())
    if handle is not None:
        loss = loss + handle.loss(y)
    mark(time.perf_counter())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    mark(time.perf_counter())
    opt.step()
    mark(time.perf_counter())


def host_breakdown(runs: dict, x, y, device: str, steps: int = 30) -> dict:
    """Median host time (microseconds) of each part of a step -- forward, filter loss, backward,
    optimiser -- for each entry of ``runs``, the device synchronised only at the end of a step.
    On a GPU a small model's step is bound by this host time, not by the kernels."""
    out = {}
    for key, (model, handle, opt, _) in runs.items():
        parts: dict[str, list[float]] = {name: [] for name in PARTS}
        for _ in range(steps):
            marks: list[float] = []
            train_step(model, handle, opt, x, y, marks)
            if device == "cuda":
                torch.cuda.synchronize()
            for name, t0, t1 in zip(PARTS, marks, marks[1:], strict=False):
                parts[name].append((t1 - t0) * 1e6)
        out[key] = {k: round(statistics.median(v), 1) for k, v in parts.items()}
    return out


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


def kernel_counts(runs: dict, x, y, device: str) -> dict:
    """Device kernels launched by one training step (CUDA; on the CPU the ``aten`` operators that
    do work), per entry of ``runs``, and the 15 kernels the loss adds most often. A small model's
    step is bound by launches on a GPU, so these counts explain the step ratio."""
    from collections import Counter

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    views = {
        "aten::view",
        "aten::as_strided",
        "aten::reshape",
        "aten::unsqueeze",
        "aten::squeeze",
        "aten::select",
        "aten::slice",
        "aten::permute",
        "aten::t",
        "aten::transpose",
        "aten::detach",
        "aten::view_as",
        "aten::flatten",
        "aten::expand",
        "aten::alias",
        "aten::_unsafe_view",
        "aten::result_type",
        "aten::resolve_conj",
        "aten::resolve_neg",
    }
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    names: dict[str, Counter] = {}
    for key, (model, handle, opt, _) in runs.items():
        with profile(activities=activities) as prof:
            train_step(model, handle, opt, x, y)
            if device == "cuda":
                torch.cuda.synchronize()
        if device == "cuda":
            evs = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
        else:
            evs = [e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in views]
        names[key] = Counter(evs)
    added = names["with"] - names["without"]
    return {
        "per_step": {k: sum(c.values()) for k, c in names.items()},
        "added_by_loss_top15": dict(added.most_common(15)),
        "unit": "CUDA kernels" if device == "cuda" else "aten operators (views excluded)",
    }


def _param_diff(m_a: nn.Module, m_b: nn.Module) -> float:
    with torch.no_grad():
        pairs = zip(m_a.parameters(), m_b.parameters(), strict=True)
        return max(float((a - b).abs().max()) for a, b in pairs)


def fused_parity(runs: dict) -> dict | None:
    """How far the fused run drifted from the unfused one: both started from the same weights and
    took the same steps on the same batch. Float reassociation in the compiled kernels makes them
    differ slightly; over many steps training amplifies any difference, so a second unfused run
    (``noise_*``: GPU kernels that are not bit-reproducible) shows how much drift is normal."""
    if "with_unfused" not in runs:
        return None
    (m_f, h_f, _, _), (m_e, h_e, _, _) = runs["with"], runs["with_unfused"]
    s_f, s_e = (next(iter(h.state_dict()["sites"].values())) for h in (h_f, h_e))
    out = {
        "max_abs_param_diff": _param_diff(m_f, m_e),
        "max_abs_param": max(float(p.detach().abs().max()) for p in m_e.parameters()),
        "log_z_max_abs_diff": float((s_f["log_z"] - s_e["log_z"]).abs().max()),
        "categories_agree": float((s_f["categories"] == s_e["categories"]).float().mean()),
    }
    if "with_unfused_again" in runs:
        m_r, h_r, _, _ = runs["with_unfused_again"]
        s_r = next(iter(h_r.state_dict()["sites"].values()))
        out["noise_max_abs_param_diff"] = _param_diff(m_r, m_e)
        out["noise_categories_agree"] = float((s_r["categories"] == s_e["categories"]).float().mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--model", default="vgg_small", help="any name of icnn_compress.models.create")
    p.add_argument("--input-size", type=int, default=28, help="input height = width, pixels")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument(
        "--fuse",
        default="auto",
        choices=("auto", "on", "off"),
        help="the loss statistics compiled (ICNNOptions.fuse); unless off, the unfused step is timed too",
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "icnn_overhead.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(a.seed)
    x = torch.rand(a.batch, a.in_channels, a.input_size, a.input_size, generator=g).to(a.device)
    y = torch.randint(0, 10, (a.batch,), generator=g).to(a.device)
    runs = {
        "without": make(a.device, 0, a.seed, a.model, a.in_channels),
        "with": make(a.device, 1, a.seed, a.model, a.in_channels, a.fuse),
        "top2": make(a.device, 2, a.seed, a.model, a.in_channels, a.fuse),
    }
    if use_fused(a.fuse, torch.device(a.device)):  # the loss step op by op too, in the same run
        runs["with_unfused"] = make(a.device, 1, a.seed, a.model, a.in_channels, "off")
        runs["with_unfused_again"] = make(a.device, 1, a.seed, a.model, a.in_channels, "off")
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(a.warmup + a.repeats):
        for key, (model, handle, opt, _) in runs.items():
            t = step(model, handle, opt, x, y, a.device)
            if i >= a.warmup:
                times[key].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    parity = fused_parity(runs)  # before the extra steps below, which runs take unevenly
    syncs = host_syncs(runs, x, y, a.device)
    host = host_breakdown(runs, x, y, a.device)
    try:
        kernels = kernel_counts(runs, x, y, a.device)
    except Exception as exc:  # the profiler is a diagnostic: its failure must not lose the timings
        kernels = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    result = {
        "benchmark": "icnn_overhead",
        "command": command_line("bench_icnn_overhead.py", a, skip=("out",)),
        "environment": environment_info(),
        "setup": {
            "model": a.model,
            "params": sum(p.numel() for p in runs["without"][0].parameters()),
            "input": list(x.shape),
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
            "step_ratio_unfused": med["with_unfused"] / med["without"] if "with_unfused" in med else None,
            "fused": use_fused(a.fuse, x.device),
            "fused_parity": parity,
            "target": "<= 1.15" if a.device == "cuda" else "<= 1.10",
            "host_syncs_per_step": syncs,
            "kernels_per_step": kernels.get("per_step"),
        },
        "kernels": kernels,
        "host_us_per_part": host,
    }
    atomic_write_json(result, a.out)
    print(
        f"median step without {med['without'] * 1e3:.1f} ms, with (top layer) {med['with'] * 1e3:.1f} ms, "
        f"ratio {result['summary']['step_ratio']:.3f}; top two {result['summary']['step_ratio_top2']:.3f} "
        f"-> {a.out}"
    )
    print(f"host time per part of a step (us): {host}")
    if syncs is not None:
        print(f"host synchronisations per step: {syncs}")
    print(f"{kernels.get('unit', 'kernels')} per step: {kernels.get('per_step', kernels)}")
    if parity is not None:
        print(f"fused vs unfused after the same steps: {parity}")


if __name__ == "__main__":
    main()
