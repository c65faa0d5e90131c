"""Category-aware compression: prune_model(..., keep_classes=) keeps the kept classes' outputs,
removes the filters of the other categories first, and the result reloads and exports."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from icnn_compress import ConfigError, models
from icnn_compress.data import ClassSubset
from icnn_compress.export import export_onnx
from icnn_compress.prune import load_pruned, prune_model, restrict_classifier, save_pruned


def class_coded_model_and_data():
    """A conv net whose 16 filters of the last conv each answer one of 4 classes (4 per class): class
    c's images are bright in channel c of the input, and filter f reads input channel f % 4."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
        for f in range(16):
            model[0].weight[f, f % 4, 1, 1] = 1.0 + 0.01 * f
        model[4].weight.zero_()
        for f in range(16):
            model[4].weight[f % 4, f] = 1.0
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 4
    x = 0.1 * torch.rand(64, 4, 8, 8, generator=g)
    x[torch.arange(64), y] += 1.0
    return model.eval(), DataLoader(TensorDataset(x, y), batch_size=16)


@pytest.mark.parametrize("mode", ["category", "relevance"])
def test_filters_of_other_categories_go_first_and_the_head_keeps_the_kept_classes(mode):
    model, data = class_coded_model_and_data()
    res = prune_model(
        model,
        torch.rand(1, 4, 8, 8),
        criterion="l2",
        target=1.9,
        data=data,
        keep_classes=[1, 3],
        keep_classes_mode=mode,
        step_ratio=0.25,
        progress=False,
        bn_batches=0,
    )
    removed = set(res.removed["0"])
    assert removed and all(f % 4 in (0, 2) for f in removed), sorted(removed)  # only other categories
    head = res.model[4]
    assert head.out_features == 2 and res.keep_classes == [1, 3]
    x, y = next(iter(data))
    kept = (y == 1) | (y == 3)
    pred = res.model(x[kept]).argmax(1)
    assert torch.equal(pred, (y[kept] == 3).long())  # output i = class keep_classes[i]


def test_a_specialised_registry_model_saves_reloads_and_exports(tmp_path):
    model = models.create("resnet_cifar8", num_classes=4, in_channels=1).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(16, 1, 16, 16, generator=g), torch.arange(16) % 4) for _ in range(2)]
    example = torch.rand(1, 1, 16, 16)
    res = prune_model(
        model,
        example,
        criterion="icnn-cluster",
        target=2.0,
        data=data,
        compensate=True,
        keep_classes=[0, 2],
        progress=False,
    )
    assert res.model.fc.out_features == 2 and res.macs_reduction >= 2.0
    path = tmp_path / "p.pt"
    save_pruned(
        res.model,
        path,
        arch="resnet_cifar8",
        arch_kwargs={"num_classes": 4, "in_channels": 1},
        history=res.history,
        input_shape=(1, 16, 16),
    )
    again, _ = load_pruned(path)
    x = torch.rand(4, 1, 16, 16)
    assert torch.allclose(again.eval()(x), res.model.eval()(x), atol=1e-5)
    export_onnx(again, tmp_path / "p.onnx", example)


def test_without_keep_classes_the_same_call_removes_across_categories():
    model, data = class_coded_model_and_data()
    res = prune_model(
        model,
        torch.rand(1, 4, 8, 8),
        criterion="l2",
        target=1.9,
        data=data,
        step_ratio=0.25,
        progress=False,
        bn_batches=0,
    )
    assert {f % 4 for f in res.removed["0"]} != {0, 2}  # l2 alone prefers the small-norm filters


def test_class_subset_renumbers_labels():
    ds = TensorDataset(torch.zeros(10, 1, 2, 2), torch.arange(10) % 5)
    sub = ClassSubset(ds, [4, 1])
    assert len(sub) == 4 and sorted(int(sub[i][1]) for i in range(4)) == [0, 0, 1, 1]
    assert all(int(ds[sub.indices[i]][1]) == [1, 4][int(sub[i][1])] for i in range(4))  # by rank


def test_restrict_classifier_matches_the_specialised_head():
    model, data = class_coded_model_and_data()
    res = prune_model(
        model, torch.rand(1, 4, 8, 8), target=1.5, data=data, keep_classes=[3, 1], progress=False
    )
    ref = restrict_classifier(model, [3, 1])
    x = next(iter(data))[0]
    assert ref[4].out_features == 2 and torch.allclose(ref(x), model(x)[:, [1, 3]])
    assert res.keep_classes == [1, 3] and res.model(x).shape == (len(x), 2)


def test_unknown_keep_classes_mode_is_a_one_line_error():
    model, data = class_coded_model_and_data()
    with pytest.raises(ConfigError, match="keep_classes_mode"):
        prune_model(
            model,
            torch.rand(1, 4, 8, 8),
            target=1.5,
            data=data,
            keep_classes=[0, 1],
            keep_classes_mode="nope",
            progress=False,
        )


@pytest.mark.parametrize(
    "keep, match",
    [
        ([1], "at least 2"),
        ([1, 1], "duplicates"),
        ([0, 9], r"0\.\.3"),
        ("ab", "list of class"),
        ([0.5, 1], "integers"),
    ],
)
def test_bad_keep_classes_are_one_line_errors(keep, match):
    model, data = class_coded_model_and_data()
    with pytest.raises(ConfigError, match=match):
        prune_model(model, torch.rand(1, 4, 8, 8), target=1.5, data=data, keep_classes=keep, progress=False)


def test_keep_classes_needs_data_and_a_linear_classifier():
    model, _ = class_coded_model_and_data()
    with pytest.raises(ConfigError, match="keep_classes needs data"):
        prune_model(model, torch.rand(1, 4, 8, 8), target=1.5, keep_classes=[0, 1], progress=False)
    conv_head = models.create("resnet_cifar8", num_classes=3, in_channels=1)
    conv_head.fc = nn.Identity()
    data = DataLoader(TensorDataset(torch.rand(8, 1, 16, 16), torch.arange(8) % 3), batch_size=8)
    with pytest.raises(ConfigError, match=r"nn\.Linear classifier"):
        prune_model(
            conv_head, torch.rand(1, 1, 16, 16), target=1.5, data=data, keep_classes=[0, 1], progress=False
        )


def test_kept_class_batches_hold_only_the_kept_classes():
    from icnn_compress.prune import kept_class_batches

    _, data = class_coded_model_and_data()  # 64 images, 16 a batch, classes 0..3 in turn
    found = kept_class_batches(data, [1, 3], batches=3)
    assert [len(x) for x, _ in found] == [16, 16]  # all 32 kept images, at the data's batch size
    assert all(set(y.tolist()) <= {1, 3} for _, y in found)
    assert [len(x) for x, _ in kept_class_batches(data, [1, 3], batches=1)] == [16]
    x, y = found[0]
    assert bool((x[torch.arange(len(y)), y].mean((1, 2)) > 0.5).all())  # images and labels stay paired
    with pytest.raises(ConfigError, match="no image of these classes"):
        kept_class_batches([(x, torch.zeros(len(x), dtype=torch.long))], [1, 3], batches=2)


def test_a_specialisation_is_compensated_and_refit_on_the_kept_classes(monkeypatch):
    import icnn_compress.prune._engine as engine
    import icnn_compress.prune._refit as refit

    seen: list = []
    collect, fit_head = engine.collect_layer_inputs, refit.refit_classifier

    def spy_collect(model, loader, *args, **kwargs):
        seen.append(("compensation", torch.cat([b[1] for b in loader])))
        return collect(model, loader, *args, **kwargs)

    def spy_refit(model, teacher, data, *args, **kwargs):
        seen.append(("refit", torch.cat([b[1] for b in data])))
        return fit_head(model, teacher, data, *args, **kwargs)

    monkeypatch.setattr(engine, "collect_layer_inputs", spy_collect)
    monkeypatch.setattr(refit, "refit_classifier", spy_refit)
    model, data = class_coded_model_and_data()
    prune_model(
        model,
        torch.rand(1, 4, 8, 8),
        criterion="l2",
        target=1.9,
        data=data,
        compensate=True,
        keep_classes=[1, 3],
        step_ratio=0.25,
        progress=False,
    )
    assert {what for what, _ in seen} == {"compensation", "refit"}
    assert all(set(labels.tolist()) <= {1, 3} for _, labels in seen)


@pytest.mark.parametrize(
    "criterion, mode, where",
    [
        ("taylor", "relevance", "engine._taylor_gradients"),
        ("fisher", "criterion", "FisherImportance.refresh"),
    ],
)
def test_loss_criteria_take_their_loss_through_the_restricted_head(monkeypatch, criterion, mode, where):
    """A criterion that reads labels with keep_classes: the loss is taken on the kept classes' images
    with their labels renumbered as the restricted head's outputs (before: class 3 against a 2-way
    head, IndexError), and the filters of the dropped classes, which the kept loss does not use, go.
    Taylor's gradients and Fisher's refresh are spied on where the engine calls them."""
    from icnn_compress.prune import _engine as engine
    from icnn_compress.prune._fisher import FisherImportance

    owner_name, attr = where.split(".")
    owner = {"engine": engine, "FisherImportance": FisherImportance}[owner_name]
    seen: list = []
    original = getattr(owner, attr)

    def spy(*args):
        model = next(a for a in args if isinstance(a, nn.Module))
        loader = args[args.index(model) + 1]
        seen.append((torch.cat([b[1] for b in loader]), model[4].out_features))
        return original(*args)

    monkeypatch.setattr(owner, attr, spy)
    model, data = class_coded_model_and_data()
    res = prune_model(
        model,
        torch.rand(1, 4, 8, 8),
        criterion=criterion,
        target=1.9,
        data=data,
        keep_classes=[1, 3],
        keep_classes_mode=mode,
        step_ratio=0.25,
        progress=False,
        bn_batches=0,
    )
    assert seen and all(heads == 2 and set(labels.tolist()) == {0, 1} for labels, heads in seen)
    assert res.removed["0"] and all(f % 4 in (0, 2) for f in res.removed["0"])


@pytest.mark.parametrize("criterion", ["taylor", "fisher"])
def test_loss_criteria_refuse_labels_the_head_has_no_output_for(criterion):
    from icnn_compress.errors import DataError

    model, data = class_coded_model_and_data()
    expected = rf"criterion '{criterion}': the data's labels run from 0 to 3, but the model has 2 outputs"
    with pytest.raises(DataError, match=expected):
        prune_model(
            restrict_classifier(model, [1, 3]),
            torch.rand(1, 4, 8, 8),
            criterion=criterion,
            target=1.5,
            data=data,
            progress=False,
            bn_batches=0,
        )


def test_criterion_mode_keeps_the_criterions_own_order():
    """keep_classes_mode='criterion': l2 removes exactly what it removes on the model with the
    restricted head, here the kept classes' weak filters, where 'category' removes the others."""
    model, data = class_coded_model_and_data()
    with torch.no_grad():  # the kept classes' filters are the weak ones
        for f in range(16):
            model[0].weight[f, f % 4, 1, 1] = 0.2 if f % 4 in (1, 3) else 3.0
    common = dict(criterion="l2", target=1.9, data=data, step_ratio=0.25, progress=False, bn_batches=0)
    example = torch.rand(1, 4, 8, 8)
    own = prune_model(model, example, keep_classes=[1, 3], keep_classes_mode="criterion", **common)
    head = prune_model(restrict_classifier(model, [1, 3]), example, **common)
    other = prune_model(model, example, keep_classes=[1, 3], keep_classes_mode="category", **common)
    assert own.removed["0"] and sorted(own.removed["0"]) == sorted(head.removed["0"])
    assert {f % 4 for f in own.removed["0"]} == {1, 3} and {f % 4 for f in other.removed["0"]} == {0, 2}
