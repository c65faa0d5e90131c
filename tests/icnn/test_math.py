"""Templates, MI and the approximate gradient against an independent float64 brute force."""

import itertools
import math

import pytest
import torch

from icnn_compress.errors import ICNNError
from icnn_compress.icnn import approximate_gradient, make_templates, mutual_information, template_scores


def brute_templates(n: int, tau: float, beta: float) -> torch.Tensor:
    out = torch.zeros(n * n + 1, n, n, dtype=torch.float64)
    for a, b, i, j in itertools.product(range(n), repeat=4):
        out[a * n + b, i, j] = tau * max(1 - beta * (abs(i - a) + abs(j - b)) / n, -1)
    out[-1] = -tau
    return out


def brute_mi(maps: torch.Tensor, tau: float, beta: float) -> list[float]:
    """MI(X;T) with explicit sums (no log-sum-exp): only for moderate scores."""
    n_img, c, n, _ = maps.shape
    t = brute_templates(n, tau, beta)
    num_t = t.shape[0]
    pt = 1.0 / num_t
    out = []
    for f in range(c):
        s = [[float((maps[k, f] * t[q]).sum()) for q in range(num_t)] for k in range(n_img)]
        z = [sum(math.exp(s[k][q]) for k in range(n_img)) for q in range(num_t)]
        p_x_t = [[math.exp(s[k][q]) / z[q] for q in range(num_t)] for k in range(n_img)]
        p_x = [sum(pt * p_x_t[k][q] for q in range(num_t)) for k in range(n_img)]
        mi = sum(
            pt * p_x_t[k][q] * math.log(p_x_t[k][q] / p_x[k]) for q in range(num_t) for k in range(n_img)
        )
        out.append(mi)
    return out


@pytest.mark.parametrize("n", [1, 3, 4, 7])
@pytest.mark.parametrize("beta", [4.0, 2.0])
def test_templates_match_brute_force(n, beta):
    got = make_templates(n, beta=beta, dtype=torch.float64)
    assert got.shape == (n * n + 1, n, n)
    torch.testing.assert_close(got, brute_templates(n, 0.5 / n**2, beta), rtol=0, atol=1e-15)


def test_templates_explicit_tau_and_centre_row():
    t = make_templates(5, tau=2.0)
    assert float(t[2 * 5 + 3, 2, 3]) == pytest.approx(2.0)  # row a*n + b peaks at (a, b)
    assert float(t[2 * 5 + 3].max()) == pytest.approx(2.0)
    assert torch.all(t[-1] == -2.0)


def test_non_square_templates_use_mean_side():
    t = make_templates((2, 4), dtype=torch.float64)
    assert t.shape == (9, 2, 4)
    tau = 0.5 / 8
    # centre (1, 2); position (0, 0): L1 distance 3, mean side 3 -> max(1 - 4, -1) = -1
    assert float(t[1 * 4 + 2, 0, 0]) == pytest.approx(-tau)
    assert float(t[1 * 4 + 2, 1, 3]) == pytest.approx(tau * (1 - 4 * 1 / 3))
    mi = mutual_information(torch.rand(5, 2, 2, 4, dtype=torch.float64))
    assert mi.shape == (2,) and torch.all(mi >= 0)


@pytest.mark.parametrize("scale", [1.0, 30.0, 200.0])
def test_mi_matches_brute_force(scale):
    maps = torch.rand(6, 3, 3, 3, dtype=torch.float64) * scale
    got = mutual_information(maps)
    want = torch.tensor(brute_mi(maps, 0.5 / 9, 4.0), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_mi_is_stable_for_huge_activations():
    maps = torch.rand(8, 2, 4, 4, dtype=torch.float64) * 1e6
    mi = mutual_information(maps)
    assert torch.isfinite(mi).all()
    assert torch.all(mi <= math.log(17) + 1e-9) and torch.all(mi >= -1e-12)


def _ideal_uniform_multipeak(n=6, num=24, height=60.0):
    g = torch.Generator().manual_seed(1)
    ideal = torch.zeros(num, 1, n, n, dtype=torch.float64)
    uniform = torch.full((num, 1, n, n), height / (n * n), dtype=torch.float64)
    multi = torch.zeros(num, 1, n, n, dtype=torch.float64)
    for k in range(num):
        if k % 2 == 0:  # own category: one peak at a varying place
            a, b = torch.randint(0, n, (2,), generator=g).tolist()
            ideal[k, 0, a, b] = height
        pos = torch.randperm(n * n, generator=g)[:4]
        multi[k, 0].view(-1)[pos] = height / 4
    return ideal, uniform, multi


def test_mi_prefers_ideal_maps():
    ideal, uniform, multi = _ideal_uniform_multipeak()
    mi_ideal, mi_uniform, mi_multi = (float(mutual_information(m)) for m in (ideal, uniform, multi))
    assert mi_ideal > mi_multi > mi_uniform - 1e-12
    assert mi_ideal > 2 * mi_multi


def test_mi_errors():
    with pytest.raises(ICNNError, match="non-negative"):
        mutual_information(-torch.ones(2, 1, 3, 3))
    with pytest.raises(ICNNError, match=r"shape \(N, C, h, w\)"):
        mutual_information(torch.ones(2, 3, 3))


def _exact_grad_fixed_z(maps: torch.Tensor) -> torch.Tensor:
    """Autograd of -MI with log Z_T computed from the batch and then held constant."""
    x = maps.clone().requires_grad_(True)
    n = x.shape[-1]
    t = brute_templates(n, 0.5 / n**2, 4.0)
    s = torch.einsum("ncij,tij->nct", x, t)
    log_z = torch.logsumexp(s.detach(), dim=0, keepdim=True)
    log_pxt = s - log_z
    log_pt = -math.log(t.shape[0])
    log_px = torch.logsumexp(log_pxt + log_pt, dim=2, keepdim=True)
    mi = (torch.exp(log_pt + log_pxt) * (log_pxt - log_px)).sum()
    (-mi).backward()
    return x.grad


def test_approximate_gradient_follows_exact_gradient():
    """Where one template dominates each map, the label-driven term is nearly the whole gradient.

    Half of the batch are own-category images with one strong part (T_mu_hat dominates), half are
    other-category images that are silent (T- dominates them).
    """
    n, num = 5, 16
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(num, 2, n, n, generator=g, dtype=torch.float64) * 0.05
    own = torch.arange(num) % 2 == 0
    peaks = torch.randint(0, n * n, (num, 2), generator=g)
    for k in range(num):
        for f in range(2):
            if own[k]:
                maps[k, f].view(-1)[peaks[k, f]] += 400.0
    exact = _exact_grad_fixed_z(maps)

    t = make_templates(n, dtype=torch.float64).reshape(n * n + 1, -1)
    s = template_scores(maps, t)
    log_z = torch.logsumexp(s, dim=0) - math.log(num)  # batch estimate of log mean exp
    peak_idx = maps.reshape(num, 2, -1).argmax(dim=2)
    t_hat = torch.where(own[:, None], peak_idx, torch.full_like(peak_idx, n * n))
    approx, mi = approximate_gradient(s, log_z, t, t_hat)
    approx = approx.reshape_as(maps)
    for rows in (own, ~own, torch.ones(num, dtype=torch.bool)):
        a, e = approx[rows].flatten(), exact[rows].flatten()
        cos = float(torch.dot(a, e) / (a.norm() * e.norm()))
        assert cos > 0.9, cos
    torch.testing.assert_close(mi, mutual_information(maps), rtol=1e-9, atol=1e-12)


def test_approximate_gradient_direction_on_own_category():
    """Descending the loss raises activations near the peak and lowers far ones."""
    n = 5
    maps = torch.zeros(8, 1, n, n, dtype=torch.float64)
    maps[:, 0, 2, 2] = 50.0
    maps[:, 0, 0, 4] = 5.0
    t = make_templates(n, dtype=torch.float64).reshape(n * n + 1, -1)
    s = template_scores(maps, t)
    log_z = torch.logsumexp(s, dim=0) - math.log(8)
    grad, _ = approximate_gradient(s, log_z, t, torch.full((8, 1), 2 * n + 2))
    grad = grad.reshape_as(maps)
    assert float(grad[0, 0, 2, 2]) < 0  # -grad raises the peak
    assert float(grad[0, 0, 0, 4]) > 0  # and lowers the far activation
