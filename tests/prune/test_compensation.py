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
