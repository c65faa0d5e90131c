"""ICNNHandle.set_masks: train with the masks, continue (and deploy) without them."""

import torch

from icnn_compress import attach_icnn, models


def test_set_masks_off_makes_the_masks_identities_and_the_loss_still_works():
    torch.manual_seed(0)
    model = models.create("vgg_small", num_classes=3, in_channels=3).eval()
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        plain = model(x)
    handle = attach_icnn(model, "auto", num_classes=3, warmup_steps=0)
    with torch.no_grad():
        masked = model(x)
    assert not torch.allclose(plain, masked)
    handle.set_masks(False)
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    model(x)
    assert torch.isfinite(handle.loss(y))  # the maps are still recorded for the loss
    handle.freeze()
    with torch.no_grad():
        assert torch.equal(model(x), plain)  # frozen without masks: the model computes what it did
    handle.set_masks(True)
    with torch.no_grad():
        assert torch.allclose(model(x), masked)
