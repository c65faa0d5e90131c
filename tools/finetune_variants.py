"""Fine-tune Fashion-MNIST bases with the filter loss in variants of the masked epoch (issue 13).

The same route as ``bench_criteria.py``'s loss models (``--masked-epochs`` epochs with masks +
loss on the ``"auto"`` layer, then the rest without masks, SGD lr 0.01, cosine), with one change:
``--below`` sets what the layers *below* the loss layer do during the masked epochs: ``train``
(as now) or ``freeze`` (their weights stay: the loss can only shape the layer it is on and those
above). The unmasked epochs train everything. Writes
``<out>/<model>_base<b>_<name>.pt`` in the format ``compare_criterion_options.py --icnn`` reads, and
the unpruned test top-1 of each into ``<out>/<name>.json``.

    .venv/bin/python tools/finetune_variants.py --model resnet_cifar20 --bases 0,1 --below freeze \\
        --name frozen --out runs/s8/variants
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import baseline_path, params_below, top1
from bench_criteria import finetune
from torch.utils.data import DataLoader, Subset

import icnn_compress as ic
from icnn_compress.io import atomic_save, atomic_write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet_cifar20")
    p.add_argument("--bases", default="0,1")
    p.add_argument("--below", default="freeze", choices=["train", "freeze"])
    p.add_argument("--name", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--masked-epochs", type=int, default=1)
    p.add_argument("--baseline-epochs", type=int, default=6)
    p.add_argument("--eval-size", type=int, default=5000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/s8/variants")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train_dl, test_dl = ic.data.loaders("fashion-mnist", batch_size=64, val_batch_size=500)
    eval_dl = DataLoader(Subset(test_dl.dataset, range(a.eval_size)), batch_size=500)
    results = {}
    for b in [int(x) for x in a.bases.split(",")]:
        base = baseline_path(a.model, a.baseline_epochs, None, b)
        model = ic.models.create(a.model, num_classes=10, in_channels=1, weights=str(base))
        handle = ic.attach_icnn(model, "auto", num_classes=10)
        finetune(
            model,
            train_dl,
            steps=None,
            epochs=a.epochs,
            lr=0.01,
            handle=handle,
            seed=b,
            masked_epochs=a.masked_epochs,
            frozen=params_below(model, handle.layers[0]) if a.below == "freeze" else None,
        )
        handle.freeze()
        atomic_save(model.state_dict(), out / f"{a.model}_base{b}_{a.name}.pt")
        results[f"base{b}"] = top1(model, eval_dl)
        print(a.name, b, results[f"base{b}"], flush=True)
    atomic_write_json({"setup": vars(a), "top1": results}, out / f"{a.model}_{a.name}.json")


if __name__ == "__main__":
    main()
