"""benchmarks/shapes/metrics.py against independent references (scipy's gaussian_filter, the judge's FD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.shapes import metrics
from benchmarks.shapes.judge import frechet_distance


def test_frechet_bootstrap_is_the_judges_distance_batched() -> None:
    """The bootstrap's batched torch form equals judge.frechet_distance (itself tested against scipy's
    sqrtm in test_shapes_benchmark.py), pair by pair; the full-set value is the judge's own."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 12)) @ rng.standard_normal((12, 12))
    b = rng.standard_normal((300, 12)) * 1.3 + 0.2
    fd, se, boots = metrics.frechet_bootstrap(a, b, n_boot=50)
    assert fd == frechet_distance(a, b) and 0 < se < fd and len(boots) == 50
    # same seed and set sizes: the same resamples, so a second feature set's replicates pair with these
    _, _, again = metrics.frechet_bootstrap(a + 0.01, b, n_boot=50)
    assert np.std(again - boots) < 0.2 * se
    pairs = [(a, b), (a[100:], b[50:]), (b, a)]
    got = metrics.frechet_batched(torch.tensor(np.stack([p[0][:150] for p in pairs])),
                                  torch.tensor(np.stack([p[1][:150] for p in pairs])))
    for i, (x, y) in enumerate(pairs):
        assert got[i].item() == pytest.approx(frechet_distance(x[:150], y[:150]), rel=1e-8)
    assert metrics.frechet_batched(torch.tensor(a[None]), torch.tensor(a[None])).item() == pytest.approx(0, abs=1e-8)


def _ssim_scipy(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """skimage's structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False),
    one channel, written with scipy.ndimage (scikit-image is not installed)."""
    from scipy.ndimage import gaussian_filter

    def f(t: np.ndarray) -> np.ndarray:
        return gaussian_filter(t, sigma=1.5, truncate=3.5)  # 11x11 window, as skimage

    ux, uy = f(x), f(y)
    vx, vy, vxy = f(x * x) - ux * ux, f(y * y) - uy * uy, f(x * y) - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return float(s[5:-5, 5:-5].mean())  # skimage crops (win_size - 1) // 2


def test_ssim_matches_scipy_reference_and_psnr_formula() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(3, 3, 32, 32, generator=g)).clamp(-1, 1)
    got = metrics.ssim(x, y)
    for i in range(3):
        want = np.mean([_ssim_scipy(x[i, c].double().numpy(), y[i, c].double().numpy(), 2.0) for c in range(3)])
        assert got[i].item() == pytest.approx(want, abs=1e-10)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(3, dtype=torch.float64))
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    assert torch.allclose(metrics.psnr(x, y), 10 * torch.log10(4 / mse))


def test_accuracies_binomial() -> None:
    truth = {"color": np.array([0, 1, 2, 3]), "shape": np.array([0, 0, 1, 1])}
    pred = {"color": np.array([0, 1, 2, 0]), "shape": np.array([0, 1, 1, 1])}
    acc = metrics.accuracies(pred, truth)
    assert acc["color"]["acc"] == 0.75 and acc["color"]["se"] == pytest.approx(np.sqrt(0.75 * 0.25 / 4))
    assert acc["all"]["acc"] == 0.5 and acc["shape"]["n"] == 4
