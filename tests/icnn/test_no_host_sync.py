"""A training step with the loss never makes the host wait for the device.

On a GPU every read of a device value on the host (``bool(t)``, ``float(t)``, ``.item()``,
``F.one_hot``'s range check) and every tensor built from host data stalls the step. Those reads go
through ``aten._local_scalar_dense`` and ``aten.lift_fresh`` on every device, so counting them on
the CPU finds the same stalls a CUDA run would have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from icnn_compress import Trainer, attach_icnn
from icnn_compress.train._trainer import SYNC_EVERY


class HostReads(TorchDispatchMode):
    """Counts the operations that read a device value on the host or copy host data to it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default):
            self.reads += 1
        return func(*args, **(kwargs or {}))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def test_the_counter_sees_a_host_read():
    with HostReads() as probe:
        bool(torch.ones(2).sum() > 0)
        torch.tensor([1.0, 2.0])
    assert probe.reads == 2


def test_loss_step_reads_nothing_between_its_periodic_checks():
    model = small_net()
    handle = attach_icnn(model, ["2"], num_classes=4, warmup_steps=0)  # balance="grad": the tap runs
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.rand(6, 1, 12, 12), torch.tensor([0, 1, 2, 3, 0, 1])

    def step() -> None:
        loss = F.cross_entropy(model(x), y) + handle.loss(y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # the first step validates targets and maps on the host, by design
        step()
    with HostReads() as probe:
        for _ in range(10):
            step()
    assert probe.reads == 0
    assert handle.last_mi["2"] == handle.last_mi["2"]  # the statistics are still readable on demand


def test_trainer_reads_the_device_every_sync_every_steps_not_every_step():
    g = torch.Generator().manual_seed(0)
    steps = 2 * SYNC_EVERY + 10
    data = TensorDataset(torch.rand(steps * 4, 1, 12, 12, generator=g), torch.arange(steps * 4) % 4)
    model = small_net()
    handle = attach_icnn(model, ["2"], num_classes=4, warmup_steps=0)
    trainer = Trainer(model, DataLoader(data, batch_size=4), extra_loss=handle.loss, progress=False, lr=0.01)
    with HostReads() as probe:
        record = trainer.train_epoch(0)
    assert record["train_acc"] >= 0.0
    # 3 periodic reads + the epoch's end (a few reads each) and the loss's checks every 50 steps,
    # where reading per step would be several reads per step
    assert probe.reads <= 30, probe.reads
    assert probe.reads < steps
