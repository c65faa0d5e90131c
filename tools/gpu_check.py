"""One script for a lent GPU machine: train with the loss on CUDA (AMP), freeze, export, run ORT.

Prints a short table and writes a JSON record (``--out``). On a machine without CUDA it runs on
the CPU and says so.

    PYTHONPATH=. python3 tools/gpu_check.py --steps 150 --out tools/results/gpu_check.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import icnn_compress as ic
from icnn_compress.export import export_onnx
from icnn_compress.io import atomic_write_json, environment_info


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=150, help="training steps (batch 64, synthetic parts 64x64)")
    p.add_argument("--out", default="tools/results/gpu_check.json")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    train_dl, val_dl = ic.data.loaders(
        "synthetic-parts", batch_size=64, train_size=64 * a.steps, val_size=1024, num_workers=4
    )
    model = ic.models.create("vgg_small", num_classes=6, in_channels=3)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-2:]
    handle = ic.attach_icnn(model, convs, num_classes=6, warmup_steps=a.steps // 3)
    trainer = ic.Trainer(
        model, train_dl, val_dl, epochs=1, extra_loss=handle.loss, lr=0.05, device=device, progress=False
    )
    t0 = time.perf_counter()
    trainer.fit()
    if device == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    metrics = trainer.history[-1]
    handle.freeze()
    model.eval()

    import onnxruntime as ort

    path = Path("/tmp/icnn_gpu_check.onnx")
    x = torch.rand(8, 3, 64, 64, device=device)
    export_onnx(model, path, x, check=False)  # parity is checked below against the provider in use
    available = ort.get_available_providers()
    wanted = [pv for pv in ("CUDAExecutionProvider", "CPUExecutionProvider") if pv in available]
    sess = ort.InferenceSession(str(path), providers=wanted)
    with torch.no_grad():
        ref = model(x).float().cpu()
    got = torch.from_numpy(sess.run(None, {"input": x.cpu().numpy()})[0])
    from icnn_compress.measure import ort_latency

    # with the CUDA provider the input and outputs stay on the GPU (IO binding): no host copies timed
    lat = ort_latency(path, 8, session=sess, warmup=5, repeats=30)
    usable = {}
    for pv in available:  # which providers really load this model (a listed one may lack its libraries)
        try:
            usable[pv] = ort.InferenceSession(str(path), providers=[pv]).get_providers()[0] == pv
        except Exception as exc:  # ONNX Runtime raises its own error types
            usable[pv] = (
                f"no: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__}"
            )
    record = {
        "benchmark": "gpu_check",
        "environment": environment_info(),
        "device": device,
        "amp": trainer.amp,
        "train": {"steps": a.steps, "seconds": train_s, "steps_per_s": a.steps / train_s, **metrics},
        "icnn_layers": convs,
        "loss_statistics_fused": ic.icnn.use_fused(handle.options.fuse, torch.device(device)),
        "last_mi": handle.last_mi,
        "onnx": {
            "available_providers": available,
            "used_providers": sess.get_providers(),
            "usable_providers": usable,
            "io_binding": lat.io_binding,
            "max_abs_diff": float((got - ref).abs().max()),
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean()),
            "latency_b8_median_ms": lat.median_ms,
        },
    }
    record["summary"] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "val_acc": metrics.get("val_acc"),
        "train_steps_per_s": record["train"]["steps_per_s"],
        "ort_provider": sess.get_providers()[0],
        "onnx_max_abs_diff": record["onnx"]["max_abs_diff"],
    }
    atomic_write_json(record, a.out)
    for k, v in record["summary"].items():
        print(f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
