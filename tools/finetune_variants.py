"""Fine-tune Fashion-MNIST bases with the filter loss in variants of the masked epoch (issue 13).

The same route as ``bench_criteria.py``'s loss models (``--masked-epochs`` epochs with masks +
loss on the ``"auto"`` layer, then the rest without masks, SGD lr 0.01, cosine), with one change:
``--below`` sets what the layers *below* the loss layer do during the masked epochs: ``train``
(as now), ``freeze`` (their weights stay: the loss can only shape the layer it is on and those
above), or a float = their learning-rate multiplier. The unmasked epochs train everything. Writes
``<out>/<model>_base<b>_<name>.pt`` in the format ``compare_criterion_options.py --icnn`` reads, and
the unpruned test top-1 of each into ``<out>/<name>.json``.

    .venv/bin/python tools/finetune_variants.py --model resnet_cifar20 --bases 0,1 --below freeze \\
        --name frozen --out runs/s8/variants
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import baseline_path, params_below
from torch.utils.data import DataLoader, Subset

import icnn_compress as ic
from icnn_compress.io import atomic_save, atomic_write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet_cifar20")
    p.add_argument("--bases", default="0,1")
    p.add_argument("--below", default="freeze", help="train | freeze | <lr multiplier>")
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
        low = params_below(model, handle.layers[0])
        opts = dict(epochs=a.masked_epochs, lr=0.01, extra_loss=handle.loss, seed=b, progress=False)
        if a.below == "freeze":
            for q in low:
                q.requires_grad_(False)
            ic.Trainer(model, train_dl, **opts).fit()
            for q in low:
                q.requires_grad_(True)
        elif a.below == "train":
            ic.Trainer(model, train_dl, **opts).fit()
        else:  # scale the gradients of the lower layers: SGD with momentum = a scaled learning rate
            scale = float(a.below)
            hooks = [q.register_hook(lambda g, s=scale: g * s) for q in low]
            ic.Trainer(model, train_dl, **opts).fit()
            for h in hooks:
                h.remove()
        handle.set_masks(False)
        if a.epochs > a.masked_epochs:
            ic.Trainer(
                model, train_dl, epochs=a.epochs - a.masked_epochs, lr=0.01, seed=b + 1, progress=False
            ).fit()
        handle.freeze()
        atomic_save(model.state_dict(), out / f"{a.model}_base{b}_{a.name}.pt")
        model.eval()
        right = total = 0
        with torch.no_grad():
            for x, y, *_ in eval_dl:
                right += int((model(x).argmax(1) == y).sum())
                total += len(y)
        results[f"base{b}"] = right / total
        print(a.name, b, results[f"base{b}"], flush=True)
    atomic_write_json({"setup": vars(a), "top1": results}, out / f"{a.model}_{a.name}.json")


if __name__ == "__main__":
    main()
