"""The API never returns a wrong result without a word (issue 12, case 7) and the loss survives
non-finite maps (case 6)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from icnn_compress import Trainer, models
from icnn_compress.errors import ConfigError, DataError, ICNNError
from icnn_compress.export import ExportError, export_onnx
from icnn_compress.icnn import attach_icnn
from icnn_compress.measure import ort_accuracy
from icnn_compress.prune import Target, prune_filters, prune_model

from ..export.test_export_measure import Branchy  # data-dependent control flow


def _data(n=32, size=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def test_ignored_modules_of_the_callers_model_are_honoured():
    model = models.create("resnet_cifar8", num_classes=3).eval()
    x, _ = _data()
    before = model.layer1[0].conv1.out_channels
    res = prune_model(model, x[:1], criterion="l2", target=1.3, ignored_layers=[model.layer1[0].conv1])
    assert res.model.layer1[0].conv1.out_channels == before
    assert res.macs_reduction >= 1.3 * 0.97
    other = models.create("resnet_cifar8", num_classes=3)
    with pytest.raises(ConfigError, match="not a module of this model"):
        prune_model(model, x[:1], criterion="l2", target=1.3, ignored_layers=[other.layer1[0].conv1])


def test_target_as_dict_and_data_as_a_list_of_batches():
    model = models.create("vgg_small", num_classes=3, in_channels=3).eval()
    x, y = _data()
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    res = prune_model(
        model, x[:1], criterion="icnn-cluster", target={"macs_reduction": 1.5}, data=batches, compensate=True
    )
    assert res.macs_reduction >= 1.5 * 0.97
    with pytest.raises(ConfigError, match="unknown key"):
        prune_model(model, x[:1], target={"macs": 2})
    with pytest.raises(ConfigError, match=r"data\[0\]"):
        prune_model(model, x[:1], criterion="icnn-cluster", data=[x])
    assert isinstance(prune_model(model, x[:1], target=Target(macs_reduction=1.2)).model, nn.Module)


def test_numpy_indices_are_accepted_by_prune_filters():
    model = models.create("vgg_small", num_classes=3, in_channels=3).eval()
    x, _ = _data()
    res = prune_filters(model, x[:1], "features.0", np.array([0, 3], dtype=np.int64), inplace=False)
    assert res.model.features[0].out_channels == model.features[0].out_channels - 2
    res = prune_filters(model, x[:1], "features.0", [np.int32(1)], inplace=False)
    assert res.removed == {"features.0": [1]}


def test_export_parity_uses_negated_and_zero_inputs_and_forwards_tracer_warnings(tmp_path):
    path = tmp_path / "b.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ExportError, match="Parity check failed"):
            export_onnx(Branchy(), path, torch.rand(1, 1, 8, 8) + 0.1)
    assert any(issubclass(w.category, torch.jit.TracerWarning) for w in caught)
    assert not path.exists()


def test_ort_accuracy_of_an_empty_loader_is_an_error(tmp_path):
    model = models.create("vgg_small", num_classes=3, in_channels=3).eval()
    export_onnx(model, tmp_path / "m.onnx", torch.rand(1, 3, 16, 16))
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(DataError, match="empty loader"):
        ort_accuracy(tmp_path / "m.onnx", empty)


def test_trainer_with_no_training_batch_is_refused():
    model = models.create("vgg_small", num_classes=3, in_channels=3)
    x, y = _data(n=8)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, drop_last=True)
    with pytest.raises(DataError, match="no batches"):
        Trainer(model, loader, epochs=1, progress=False)


def test_attach_icnn_twice_on_one_layer_is_refused_and_works_after_remove():
    model = models.create("vgg_small", num_classes=3, in_channels=3)
    handle = attach_icnn(model, "features.23", num_classes=3)
    with pytest.raises(ICNNError, match="already has an ICNN mask"):
        attach_icnn(model, "features.23", num_classes=3)
    handle.remove()
    attach_icnn(model, "features.23", num_classes=3).freeze()
    with pytest.raises(ICNNError, match=r"already has (an ICNN mask|frozen ICNN masks)"):
        attach_icnn(model, "features.23", num_classes=3)


def test_one_nan_image_is_skipped_and_never_reaches_the_running_state():
    torch.manual_seed(0)
    model = models.create("vgg_small", num_classes=3, in_channels=3)
    handle = attach_icnn(model, "features.23", num_classes=3, warmup_steps=0, balance="none")
    x, y = _data(n=8)
    for _ in range(2):
        logits = model(x)
        (nn.functional.cross_entropy(logits, y) + handle.loss(y)).backward()
    x_bad = x.clone()
    x_bad[3, 0, 5, 5] = float("nan")
    model.eval()  # BatchNorm on running statistics: only image 3 becomes NaN
    out = model(x_bad)
    loss = handle.loss(y)
    assert torch.isfinite(loss)
    loss.backward()
    state = handle._sites["features.23"].state.state_dict()
    for key in ("log_z", "class_stats"):
        assert torch.isfinite(state[key]).all(), key
    assert handle.skipped_images == {"features.23": 1}
    assert not torch.isfinite(out[3]).all()  # the image itself is NaN: the task loss tells the Trainer
    # in training mode the batch statistics spread the NaN to every image: all are skipped, the
    # loss is zero and the state is left alone
    before = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
    model.train()
    model(x_bad)
    assert float(handle.loss(y).detach()) == 0.0
    assert handle.skipped_images == {"features.23": 1 + 8}
    after = handle._sites["features.23"].state.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_trainer_sets_aside_stale_corrupt_and_foreign_checkpoints(tmp_path):
    x, y = _data(n=32)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)

    def trainer(key, epochs=1, classes=3):
        model = models.create("vgg_small", num_classes=classes, in_channels=3)
        return Trainer(
            model, loader, epochs=epochs, out_dir=tmp_path, resume=True, run_key=key, progress=False
        )

    trainer("a").fit()
    ckpt = tmp_path / "checkpoints" / "last.pt"
    assert trainer("a", epochs=1).fit().global_step == 2  # resumed: nothing left to do
    assert trainer("b", epochs=1).fit().global_step == 2  # another key: trained from the start
    assert (tmp_path / "checkpoints" / "last.pt.stale-1").is_file()
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    t = trainer("b", epochs=1)
    assert t.fit().global_step == 2 and (tmp_path / "checkpoints" / "last.pt.stale-2").is_file()
    torch.save({"evil": 1}, ckpt)  # not a checkpoint of the toolkit
    assert trainer("b").fit().global_step == 2 and (tmp_path / "checkpoints" / "last.pt.stale-3").is_file()
