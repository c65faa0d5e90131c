"""attach_icnn: hooks, errors, remove/freeze life cycle, export, state."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icnn_compress import ICNNError, attach_icnn
from icnn_compress.icnn import ICNNMask, find_activation


def tiny_vgg(num_classes: int = 5, bn: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(3, 8, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(16))
    layers += [nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes)]
    return nn.Sequential(*layers)


class Block(nn.Module):
    """Not an nn.Sequential: exercises the fx path and a shared ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def test_auto_resolves_last_conv_and_its_relu_through_bn():
    model = tiny_vgg()
    h = attach_icnn(model, "auto", num_classes=5)
    assert h.layers == ["4"]
    assert h.hook_points == {"4": "6"}


def test_loss_backward_and_categories():
    model = tiny_vgg()
    h = attach_icnn(model, ["0", "4"], num_classes=5)
    x, y = torch.rand(10, 3, 16, 16), torch.arange(10) % 5
    loss = F.cross_entropy(model(x), y) + h.loss(y)
    loss.backward()
    assert torch.isfinite(loss)
    cats = h.filter_categories
    assert set(cats) == {"0", "4"}
    assert cats["4"].shape == (16,) and cats["4"].dtype == torch.long
    assert int(cats["4"].min()) >= 0 and int(cats["4"].max()) < 5
    assert all(m.grad is not None for m in model.parameters())
    assert set(h.last_mi) == {"0", "4"}


def test_loss_gradient_only_reaches_layers_below():
    model = tiny_vgg(bn=False)
    h = attach_icnn(model, "3", num_classes=5, balance="none", weight=10.0)
    model(torch.rand(4, 3, 8, 8))
    h.loss(torch.tensor([0, 1, 2, 3])).backward()
    assert model[0].weight.grad is not None and model[3].weight.grad.abs().sum() > 0
    assert model[-1].weight.grad is None  # the classifier is above the ICNN layer


def test_balanced_and_single_categories():
    model = tiny_vgg()
    h = attach_icnn(model, "4", num_classes=4, categories="balanced")
    model(torch.rand(8, 3, 8, 8))
    h.loss(torch.arange(8) % 4)
    counts = torch.bincount(h.filter_categories["4"], minlength=4)
    assert counts.tolist() == [4, 4, 4, 4]

    model = tiny_vgg()
    h = attach_icnn(model, "4", num_classes=2, categories="single", positive_class=1)
    model(torch.rand(4, 3, 8, 8))
    h.loss(torch.tensor([0, 1, 0, 1]))
    assert torch.all(h.filter_categories["4"] == 1)


def test_remove_restores_bit_identical_outputs():
    model = tiny_vgg().eval()
    x = torch.rand(3, 3, 16, 16)
    before = model(x)
    keys = list(model.state_dict())
    h = attach_icnn(model, "4", num_classes=5, extra_conv=True)
    assert not torch.equal(model(x), before)
    h.remove()
    assert torch.equal(model(x), before)
    assert list(model.state_dict()) == keys
    with pytest.raises(ICNNError, match="removed"):
        h.loss(torch.zeros(3, dtype=torch.long))


def test_freeze_keeps_outputs_and_masks_in_the_model(tmp_path):
    model = tiny_vgg().eval()
    h = attach_icnn(model, ["0", "4"], num_classes=5, extra_conv=["4"])
    x = torch.rand(2, 3, 16, 16)
    hooked = model(x)
    h.freeze()
    assert sum(isinstance(m, ICNNMask) for m in model.modules()) == 3
    torch.testing.assert_close(model(x), hooked, rtol=0, atol=0)
    # the loss still works on the frozen model, and remove() is refused
    model.train()
    model(torch.rand(4, 3, 16, 16))
    h.loss(torch.tensor([0, 1, 2, 3])).backward()
    with pytest.raises(ICNNError, match="frozen"):
        h.remove()
    # a plain copy is a standalone model with the same outputs
    model.eval()
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), model(x))


def test_frozen_model_exports_to_onnx_with_parity(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = tiny_vgg().eval()
    h = attach_icnn(model, "4", num_classes=5)
    h.freeze()
    x = torch.rand(2, 3, 16, 16)
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        model,
        (x,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}},
        dynamo=False,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.rand(5, 3, 16, 16)
    got = sess.run(None, {"input": x2.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model(x2), rtol=1e-4, atol=1e-5)


def test_centroid_mask_differs_from_argmax_and_is_bounded():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 0, 0] = 1.0
    x[0, 0, 0, 4] = 1.0
    argmax = ICNNMask(centre="argmax").mask(x)
    centroid = ICNNMask(centre="centroid").mask(x)
    assert float(argmax[0, 0, 0, 0]) == 1.0 and float(argmax[0, 0, 0, 4]) == 0.0
    assert float(centroid[0, 0, 0, 2]) == 1.0  # centre between the two peaks
    assert float(centroid.max()) <= 1.0 and float(centroid.min()) >= 0.0


def test_state_dict_round_trip():
    model = tiny_vgg()
    h = attach_icnn(model, "4", num_classes=5)
    for _ in range(3):
        model(torch.rand(6, 3, 8, 8))
        h.loss(torch.arange(6) % 5).backward()
    state = h.state_dict()
    h2 = attach_icnn(copy.deepcopy(model), "4", num_classes=5)
    h2.load_state_dict(state)
    assert torch.equal(h2.filter_categories["4"], h.filter_categories["4"])
    assert h2.step == 3


def test_autocast_cpu_bfloat16():
    model = tiny_vgg()
    h = attach_icnn(model, "4", num_classes=5)
    y = torch.arange(4) % 5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(4, 3, 8, 8))
        loss = F.cross_entropy(out, y) + h.loss(y)
    loss.backward()
    assert torch.isfinite(loss.float())


def test_fx_resolution_and_shared_activation_is_refused():
    with pytest.raises(ICNNError, match="shared by 2 calls"):
        attach_icnn(Block(), "conv2", num_classes=3)
    with pytest.raises(ICNNError, match="ran 2 times"):
        model = Block()
        h = attach_icnn(model, "relu", num_classes=3)
        model(torch.rand(2, 3, 8, 8))
        del h


def test_find_activation_without_relu_names_the_fix():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(ICNNError, match="No ReLU module takes the output of '0'"):
        find_activation(model, "0")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(layers="features.99"), "no module named 'features.99'"),
        (dict(layers="5"), "did you mean|Did you mean|not a conv layer"),
        (dict(layers="7"), "is a AdaptiveAvgPool2d, not a conv layer"),
        (dict(layers="4", balance="sometimes"), "'balance' option of attach_icnn must be one of"),
        (dict(layers="4", weight=-1.0), "'weight' option of attach_icnn must be a finite float >= 0"),
        (dict(layers="4", centre="middle"), "'centre' option of attach_icnn must be one of"),
        (dict(layers="4", categories="some"), "'categories' option of attach_icnn must be one of"),
        (
            dict(layers="4", wieght=0.5),
            "Unknown option\\(s\\) 'wieght' of attach_icnn; the options are weight,",
        ),
        (
            dict(layers="4", categories="single", positive_class=7),
            "'positive_class' option must be in \\[0, 5\\)",
        ),
        (dict(layers="4", z_momentum=0.0), r"'z_momentum' option of attach_icnn must be a float in \(0, 1\]"),
        (dict(layers="4", options={"weight": 1.0}), "options must be an ICNNOptions"),
        (dict(layers="4", num_classes=1), "num_classes must be an int >= 2"),
        (dict(layers=["4", "4"]), "duplicates"),
        (dict(layers="4", extra_conv=["0"]), "not in layers"),
    ],
)
def test_attach_errors(kwargs, match):
    kwargs.setdefault("num_classes", 5)
    with pytest.raises(ICNNError, match=match):
        attach_icnn(tiny_vgg(), **kwargs)


def test_close_name_suggestion():
    with pytest.raises(ICNNError, match=r"Did you mean '0\.0\.4'"):
        attach_icnn(nn.Sequential(nn.Sequential(tiny_vgg())), "0.0.44", num_classes=5)


def test_loss_input_errors():
    model = tiny_vgg()
    h = attach_icnn(model, "4", num_classes=5)
    with pytest.raises(ICNNError, match="No maps recorded"):
        h.loss(torch.zeros(2, dtype=torch.long))
    model(torch.rand(3, 3, 8, 8))
    with pytest.raises(ICNNError, match=r"targets must be in \[0, 5\)"):
        h.loss(torch.tensor([0, 1, 5]))
    with pytest.raises(ICNNError, match="integer class indices"):
        h.loss(torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ICNNError, match="1-D tensor"):
        h.loss(torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ICNNError, match="targets has 2 entries but the last forward pass had 3"):
        h.loss(torch.tensor([0, 1]))


def test_negative_maps_are_refused():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Flatten(), nn.LazyLinear(2))
    h = attach_icnn(model, "0", num_classes=2)  # a block without ReLU
    model(torch.randn(2, 3, 6, 6))
    with pytest.raises(ICNNError, match="negative values"):
        h.loss(torch.tensor([0, 1]))


def test_balanced_gradient_is_invariant_to_a_loss_scale():
    """Under AMP the GradScaler multiplies every gradient by s: balance='grad' must divide it out."""
    grads = {}
    for scale in (1.0, 1024.0):
        torch.manual_seed(0)
        model = tiny_vgg(bn=False)
        h = attach_icnn(model, "3", num_classes=5, warmup_steps=0)
        x, y = torch.rand(6, 3, 8, 8), torch.arange(6) % 5
        for _ in range(3):
            model.zero_grad()
            (scale * (F.cross_entropy(model(x), y) + h.loss(y))).backward()
        grads[scale] = model[0].weight.grad / scale
    torch.testing.assert_close(grads[1024.0], grads[1.0], rtol=1e-4, atol=1e-7)


def test_options_object_and_keywords_are_the_same_and_keywords_override():
    from dataclasses import replace

    from icnn_compress.icnn import ICNNOptions

    opts = ICNNOptions(weight=0.25, warmup_steps=0, categories="balanced")
    a = attach_icnn(tiny_vgg(), "4", 5, opts)
    b = attach_icnn(tiny_vgg(), "4", 5, weight=0.25, warmup_steps=0, categories="balanced")
    assert a.options == b.options == opts
    c = attach_icnn(tiny_vgg(), "4", 5, opts, weight=2.0)  # a keyword replaces the object's value
    assert c.options == replace(opts, weight=2.0) and opts.weight == 0.25
    assert set(ICNNOptions.names()) >= {"weight", "balance", "beta", "tau", "refresh_every"}
