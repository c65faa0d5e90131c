"""The classifier refit after pruning: the pruned model's logits move towards the unpruned model's on
the probe, and a refit that the probe cannot determine is not made."""

from __future__ import annotations

import copy

import torch
from torch import nn

from icnn_compress.prune import prune_model, refit_classifier


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()


def _data(batches: int = 6, n: int = 16) -> list:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(batches)
    ]


@torch.no_grad()
def _logit_error(pruned: nn.Module, teacher: nn.Module, data: list) -> float:
    pruned.eval()
    return sum(float((pruned(x) - teacher(x)).pow(2).mean()) for x, *_ in data) / len(data)


def test_prune_model_refits_the_classifier_towards_the_unpruned_logits_by_default():
    model, data = _model(), _data()
    before = copy.deepcopy(model.state_dict())
    kw = dict(criterion="l2", target=2.0, data=data, compensate=True, round_to=None, progress=False)
    plain = prune_model(model, torch.rand(1, 3, 8, 8), refit_classifier=False, **kw)
    refit = prune_model(model, torch.rand(1, 3, 8, 8), **kw)
    assert refit.classifier_refit and not plain.classifier_refit
    assert refit.summary()["classifier_refit"] is True
    # the same channels went; only the classifier differs
    assert refit.removed == plain.removed
    assert torch.equal(refit.model[0].weight, plain.model[0].weight)
    assert not torch.equal(refit.model[8].weight, plain.model[8].weight)
    assert _logit_error(refit.model, model, data) < 0.5 * _logit_error(plain.model, model, data)
    for key, value in model.state_dict().items():  # the caller's model was only read
        assert torch.equal(value, before[key]), key


def test_a_module_as_refit_classifier_is_the_model_whose_logits_are_fit():
    # e.g. the base model a fine-tune with the filter loss started from (recover.teacher-like)
    model, data = _model(), _data()
    torch.manual_seed(5)
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    other_before = copy.deepcopy(other.state_dict())
    kw = dict(criterion="l2", target=2.0, data=data, compensate=True, round_to=None, progress=False)
    own = prune_model(model, torch.rand(1, 3, 8, 8), **kw)
    to_other = prune_model(model, torch.rand(1, 3, 8, 8), refit_classifier=other, **kw)
    assert to_other.classifier_refit and to_other.removed == own.removed
    assert _logit_error(to_other.model, other, data) < 0.5 * _logit_error(own.model, other, data)
    assert _logit_error(own.model, model, data) < _logit_error(to_other.model, model, data)
    for key, value in other.state_dict().items():  # the teacher was only read
        assert torch.equal(value, other_before[key]), key


def test_inplace_pruning_refits_against_a_copy_of_the_unpruned_model():
    model, data = _model(), _data()
    reference = copy.deepcopy(model)
    kw = dict(criterion="l2", target=2.0, data=data, compensate=True, round_to=None, progress=False)
    res = prune_model(model, torch.rand(1, 3, 8, 8), inplace=True, **kw)
    assert res.model is model and res.classifier_refit
    unrefit = prune_model(reference, torch.rand(1, 3, 8, 8), refit_classifier=False, **kw).model
    assert _logit_error(res.model, reference, data) < _logit_error(unrefit, reference, data)


def test_refit_is_not_made_with_fewer_than_two_probe_rows_per_unknown():
    model, teacher = _model(), _model()
    with torch.no_grad():
        teacher[8].weight.mul_(2.0)
    weight = model[8].weight.clone()
    # 16 features + a bias = 17 unknowns per output: 32 rows are too few, 48 are enough
    assert not refit_classifier(model, teacher, _data(batches=2), max_batches=2)
    assert torch.equal(model[8].weight, weight)
    assert refit_classifier(model, teacher, _data(batches=3), max_batches=3)
    assert not torch.equal(model[8].weight, weight)


def test_refit_recovers_an_exactly_reachable_classifier():
    model, teacher = _model(), _model()
    with torch.no_grad():  # the same features, another head: the fit must find the teacher's head
        teacher[8].weight.copy_(torch.randn(4, 16))
        teacher[8].bias.copy_(torch.randn(4))
    assert _logit_error(model, teacher, _data()) > 0.1
    assert refit_classifier(model, teacher, _data(), ridge=1e-9)
    # the features are nearly collinear, so the weights are determined only up to rounding: the
    # logits are what the fit reaches
    assert _logit_error(model, teacher, _data()) < 1e-8


def test_refit_with_kept_classes_fits_their_outputs_in_order():
    model, teacher = _model(), _model()
    kept = [1, 3]
    head = nn.Linear(16, 2)
    model[8] = head
    with torch.no_grad():
        teacher[8].weight.copy_(torch.randn(4, 16))
    assert refit_classifier(model, teacher, _data(), ridge=1e-9, classes=kept)
    with torch.no_grad():
        gap = max(float((model(x) - teacher(x)[:, kept]).abs().max()) for x, *_ in _data())
    assert gap < 1e-3
    # a head whose width matches neither all the teacher's outputs nor the kept ones is left alone
    assert not refit_classifier(model, teacher, _data(), classes=[0, 1, 2])


def test_a_model_without_a_linear_classifier_is_not_refit():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert not refit_classifier(model, copy.deepcopy(model), _data())


def test_refit_leaves_every_module_of_both_models_in_its_own_mode():
    model, teacher = _model(), _model()
    teacher[1].train()  # a caller's model with one module in training mode
    model.train()
    running = teacher[1].running_mean.clone()
    assert refit_classifier(model, teacher, _data())
    assert teacher[1].training and not teacher.training and not teacher[4].training
    assert all(m.training for m in model.modules())
    assert torch.equal(teacher[1].running_mean, running)  # read in eval mode: statistics untouched


def test_a_last_linear_that_is_not_the_output_is_not_refit():
    class SqueezeHead(nn.Module):  # a Linear inside the network (squeeze-excitation), a conv head
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 4)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            gate = torch.sigmoid(self.fc(y.mean((2, 3))))
            return self.head(y * gate[:, :, None, None]).mean((2, 3))

    torch.manual_seed(0)
    model = SqueezeHead()
    weight = model.fc.weight.clone()
    assert not refit_classifier(model, copy.deepcopy(model), _data())
    assert torch.equal(model.fc.weight, weight)
