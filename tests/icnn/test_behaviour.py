"""Behaviour: the loss makes peak locations consistent on a toy localisation task."""

import torch
import torch.nn.functional as F
from torch import nn

from icnn_compress import attach_icnn

SIDE = 24
PATTERNS = [
    torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]]).float(),
    torch.tensor([[1, 1, 1], [1, 0, 1], [1, 1, 1]]).float(),
    torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]]).float(),
]
PLACES = [(5, 5), (5, 16), (16, 10)]


def toy_batch(n: int, g: torch.Generator):
    """Class c = pattern c near a class-specific place (+-2 px), plus a weaker distractor pattern
    of another class anywhere, on noise. Returns images, labels and part centres (row, col)."""
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.rand(n, 1, SIDE, SIDE, generator=g) * 0.3
    centre = torch.zeros(n, 2)
    for k in range(n):
        c = int(y[k])
        a, b = (v + int(torch.randint(-2, 3, (1,), generator=g)) for v in PLACES[c])
        x[k, 0, a : a + 3, b : b + 3] += PATTERNS[c]
        centre[k] = torch.tensor([a + 1, b + 1])
        d = (c + 1 + int(torch.randint(0, 2, (1,), generator=g))) % 3
        a2, b2 = torch.randint(0, SIDE - 3, (2,), generator=g).tolist()
        x[k, 0, a2 : a2 + 3, b2 : b2 + 3] += 0.6 * PATTERNS[d]
    return x, y, centre


def toy_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 24, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 3),
    )


def train_and_measure(with_loss: bool, steps: int = 400, seed: int = 0):
    torch.manual_seed(seed)
    model = toy_net()
    handle = attach_icnn(model, "6", num_classes=3) if with_loss else None
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y, _ = toy_batch(32, g)
        loss = F.cross_entropy(model(x), y)
        if handle is not None:
            loss = loss + handle.loss(y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y, _ = toy_batch(600, torch.Generator().manual_seed(123))
    maps = {}
    hook = model[7].register_forward_hook(lambda m, i, o: maps.setdefault("x", o.detach()))
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    hook.remove()
    a = maps["x"]  # (N, C, 6, 6) maps of the ICNN layer before the mask
    n, c = a.shape[:2]
    idx = a.reshape(n, c, -1).argmax(2)
    rows, cols = (idx // 6).float(), (idx % 6).float()
    response = a.sum((2, 3))
    category = torch.stack([response[y == k].mean(0) for k in range(3)], 1).argmax(1)
    spreads = []
    for f in range(c):
        sel = (y == category[f]) & (a[:, f].amax((1, 2)) > 0)
        if int(sel.sum()) >= 5:  # the peak's spread (map cells) over its category's images
            spreads.append(float(torch.sqrt(rows[sel, f].var() + cols[sel, f].var())))
    return acc, sum(spreads) / len(spreads)


def test_loss_makes_peak_locations_consistent():
    acc_plain, spread_plain = train_and_measure(False)
    acc_icnn, spread_icnn = train_and_measure(True)
    assert acc_plain > 0.95
    assert acc_icnn > acc_plain - 0.02, (acc_icnn, acc_plain)
    assert spread_icnn < 0.7 * spread_plain, (spread_icnn, spread_plain)
