"""Quality metrics of the shapes benchmark, each with its standard error.

- attribute accuracy: the judge's prediction against the caption's attribute, per attribute and for
  "all attributes right" per image; binomial standard error sqrt(p (1 - p) / n).
- Fréchet distance between Gaussians fitted to judge features (judge.frechet_distance: FID's formula on
  the judge's penultimate layer), standard error by bootstrap over both sample sets.
- PSNR and SSIM of each image against the FP32 image of the same seed; mean and its standard error
  over images.

SSIM is written here (torch, so it runs where the images are, on the GPU) because scikit-image is not a
dependency of trtkit nor installed here; it is Wang et al. 2004 with skimage's
`gaussian_weights=True, sigma=1.5, use_sample_covariance=False` settings (11x11 Gaussian window, K1 0.01,
K2 0.03, mean over the valid region and the channels), checked against a scipy.ndimage version in the tests.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def mean_se(values: np.ndarray | torch.Tensor) -> tuple[float, float]:
    v = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def binomial(correct: np.ndarray) -> tuple[float, float]:
    """Share of True and its binomial standard error."""
    c = np.asarray(correct, dtype=bool)
    p = float(c.mean())
    return p, math.sqrt(p * (1 - p) / len(c))


def accuracies(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """{attribute: {"acc", "se", "n"}} plus "all" (every attribute of the image right)."""
    out: dict[str, dict[str, float]] = {}
    every = None
    for attr, t in truth.items():
        ok = np.asarray(pred[attr]) == np.asarray(t)
        every = ok if every is None else every & ok
        p, se = binomial(ok)
        out[attr] = {"acc": p, "se": se, "n": int(len(ok))}
    assert every is not None
    p, se = binomial(every)
    out["all"] = {"acc": p, "se": se, "n": int(len(every))}
    return out


# -- Fréchet distance -------------------------------------------------------------------------------

def frechet_batched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """judge.frechet_distance for a batch of feature-set pairs a [B, N, D], b [B, M, D] (float64), batched
    in torch so that a bootstrap runs as a few batched eigh calls (on the GPU where the features are)."""
    mu_a, mu_b = a.mean(1), b.mean(1)
    ca, cb = a - mu_a[:, None], b - mu_b[:, None]
    sa, sb = ca.transpose(1, 2) @ ca / (a.shape[1] - 1), cb.transpose(1, 2) @ cb / (b.shape[1] - 1)
    w, v = torch.linalg.eigh(sa)
    root = (v * w.clamp_min(0).sqrt()[:, None, :]) @ v.transpose(1, 2)
    cross = torch.linalg.eigvalsh(root @ sb @ root).clamp_min(0).sqrt().sum(1)
    tr = sa.diagonal(dim1=1, dim2=2).sum(1) + sb.diagonal(dim1=1, dim2=2).sum(1) - 2 * cross
    return ((mu_a - mu_b) ** 2).sum(1) + tr


def frechet_bootstrap(gen: np.ndarray, real: np.ndarray, n_boot: int = 100, seed: int = 0,
                      device: str = "cpu", batch: int = 25) -> tuple[float, float, np.ndarray]:
    """judge.frechet_distance of the full sets, its bootstrap standard error (both sets resampled), and the
    bootstrap replicates. The resampling indices depend only on `seed` and the set sizes, so replicates of
    two modes (same sample count, same real set) are paired: std(b1 - b2) is the s.e. of their difference."""
    from benchmarks.shapes.judge import frechet_distance

    fd = frechet_distance(gen, real)
    if n_boot < 2:
        return fd, 0.0, np.zeros(0)
    rng = np.random.default_rng(seed)
    g = torch.as_tensor(gen, dtype=torch.float64, device=device)
    r = torch.as_tensor(real, dtype=torch.float64, device=device)
    boots = []
    for start in range(0, n_boot, batch):
        k = min(batch, n_boot - start)
        ig = torch.as_tensor(rng.integers(0, len(gen), (k, len(gen))), device=device)
        ir = torch.as_tensor(rng.integers(0, len(real), (k, len(real))), device=device)
        boots.append(frechet_batched(g[ig], r[ir]).cpu())
    b = torch.cat(boots).numpy()
    return fd, float(b.std(ddof=1)), b


# -- image distances --------------------------------------------------------------------------------

def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB ([N, C, H, W]; images in [-1, 1] by default). Identical images give inf."""
    mse = (x.double() - ref.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    g = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0, win: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM ([N, C, H, W]), mean over channels and the valid (unpadded) window positions."""
    n, c = x.shape[:2]
    k = _window(win, sigma, x.device).expand(c, 1, win, win)
    a, b = x.double(), ref.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, k, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.reshape(n, -1).mean(1)
