"""TensorBoard logging of the Trainer's metrics (the tensorboard package is in the test extras)."""

import json

import pytest
import torch
from torch import nn

import icnn_compress as ic
from icnn_compress.errors import ConfigError
from icnn_compress.recipe import Runner, load_recipe
from icnn_compress.train import TensorBoardLogger


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_trainer_metrics_are_written_per_epoch(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    data = [(torch.rand(8, 3, 2, 2), torch.randint(0, 3, (8,))) for _ in range(3)]
    trainer = ic.Trainer(
        model,
        data,
        data,
        epochs=2,
        progress=False,
        callbacks=[TensorBoardLogger(tmp_path / "tb", prefix="t/")],
    )
    trainer.fit()
    scalars = _scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["t/train_loss"]] == [1, 2]
    assert scalars["t/val_acc"][-1][1] == pytest.approx(trainer.history[-1]["val_acc"])


def test_recipe_key_writes_the_stages_metrics_and_is_checked_first(tmp_path, monkeypatch):
    from tests.recipe.test_cli import TINY

    data = json.loads(json.dumps(TINY))
    data["finetune"]["tensorboard"] = True
    Runner(load_recipe(data), tmp_path / "run", stages=["finetune"], progress=False).run()
    scalars = _scalars(tmp_path / "run" / "1_finetune" / "tensorboard")
    assert [s for s, _ in scalars["finetune/train/train_loss"]] == [1, 2]
    monkeypatch.setattr("icnn_compress.train.tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match=r"finetune\.tensorboard: true needs the 'tensorboard' package"):
        Runner(load_recipe(data), tmp_path / "other", progress=False).check()
    assert not (tmp_path / "other").exists()
