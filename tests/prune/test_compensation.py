"""Compensation's least-squares fit: exact on reconstructible channels, and refused where the probe
cannot determine it."""

from __future__ import annotations

import torch

from icnn_compress.prune._compensation import fit_reconstruction, well_posed


def test_fit_recovers_a_channel_that_is_a_mix_of_the_kept_ones():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(500, 6, generator=g)
    acts[:, 5] = 0.5 * acts[:, 0] - 2.0 * acts[:, 3] + 0.25  # removed = mix of kept + intercept
    w, b = fit_reconstruction(acts, [5], [0, 1, 2, 3, 4], ridge=1e-9)
    assert torch.allclose(w[:, 0], torch.tensor([0.5, 0.0, 0.0, -2.0, 0.0], dtype=w.dtype), atol=1e-6)
    assert abs(float(b[0]) - 0.25) < 1e-6


def test_a_fit_with_fewer_than_two_rows_per_unknown_is_not_attempted():
    assert well_posed(4096, 160)
    assert not well_posed(4096, 4095)  # VGG's hidden Linear: 4096 probe rows, 4096 inputs
    assert not well_posed(10, 5) and well_posed(12, 5)


def _conv_linear_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 6, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 4 * 4, 5),
    )


def _compensated(monkeypatch, block: int) -> torch.nn.Sequential:
    """The model after removing 3 filters of each conv with compensation, folding ``block``
    float64 elements of each consumer's weight at a time."""
    import icnn_compress.prune._compensation as compensation
    from icnn_compress.prune import prune_filters

    monkeypatch.setattr(compensation, "FOLD_BLOCK", block)
    model = _conv_linear_model()
    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(8, 3, 4, 4, generator=g), torch.zeros(8, dtype=torch.long)) for _ in range(4)]
    for layer in ("0", "2"):
        prune_filters(model, torch.rand(1, 3, 4, 4), layer, [0, 2, 5], compensate=True, data=data)
    return model


def test_folding_a_block_of_rows_at_a_time_gives_the_same_weights(monkeypatch):
    whole = _compensated(monkeypatch, 1 << 22)
    rowwise = _compensated(monkeypatch, 7)  # one output row (or less) at a time
    for (name, a), (_, b) in zip(whole.state_dict().items(), rowwise.state_dict().items()):
        assert torch.equal(a, b), name
    assert whole[5].in_features == 3 * 4 * 4  # the flattened classifier was compensated per channel


def test_input_energy_is_the_squared_norm_per_input_channel():
    from icnn_compress.prune._criteria import input_energy

    g = torch.Generator().manual_seed(0)
    conv, linear = torch.randn(5, 4, 3, 3, generator=g), torch.randn(7, 6, generator=g)
    scale = torch.rand(5, generator=g)
    expected = (conv.double().pow(2) * scale.double().view(-1, 1, 1, 1)).sum(dim=(0, 2, 3))
    for block in (1, 10, 1 << 22):  # several output rows per block, one, and all
        assert torch.allclose(input_energy(conv, scale, block=block), expected)
        assert torch.allclose(input_energy(linear, block=block), linear.double().pow(2).sum(0))
