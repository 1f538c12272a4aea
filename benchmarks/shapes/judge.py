"""The judge: a small CNN that reads a 32x32 shapes image back into its canonical attributes
(render.ATTRIBUTES: colour and shape of the top/left object `a` and of the other one `b`, and the axis).

    judge = load_judge(weights_dir, device)
    judge.predict(images)   # {attribute: int64 (N,)} from uint8 (N, 32, 32, 3)
    judge.features(images)  # float32 (N, D) penultimate features, for frechet_distance()
    accuracy(judge, images, scenes)  # {attribute: fraction correct, ..., "scene": all five right}

It is trained on renders with noise, blur and colour jitter (train.py: augment) so that it reads generated
images as well as clean ones. The head flattens a 4x4 map rather than pooling it, so where things are
(which object is on top) survives to the classifiers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.shapes.render import ATTRIBUTES, Scene, labels

FEATURES = 256


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2))


class Judge(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.body = nn.Sequential(_block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width))
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, FEATURES), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURES, n) for k, n in ATTRIBUTES.items()})

    def config(self) -> dict[str, Any]:
        return {"width": self.width}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features of float NCHW images in [0, 1]."""
        return self.neck(self.body((x - 0.5) * 4))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.embed(x)
        return {k: h(f) for k, h in self.heads.items()}

    def _batches(self, images: np.ndarray | torch.Tensor, batch: int = 1024):  # type: ignore[no-untyped-def]
        images = torch.as_tensor(images)
        for s in range(0, len(images), batch):
            yield images[s:s + batch].to(self.device).permute(0, 3, 1, 2).float() / 255.0

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """{attribute: int64 (N,)} for uint8 (N, 32, 32, 3) images."""
        outs: dict[str, list[np.ndarray]] = {k: [] for k in ATTRIBUTES}
        for x in self._batches(images):
            for k, v in self(x).items():
                outs[k].append(v.argmax(1).cpu().numpy())
        return {k: np.concatenate(v) for k, v in outs.items()}

    @torch.no_grad()
    def features(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """float64 (N, FEATURES) penultimate features of uint8 (N, 32, 32, 3) images."""
        return np.concatenate([self.embed(x).double().cpu().numpy() for x in self._batches(images)])


def accuracy(judge: Judge, images: np.ndarray, scenes: list[Scene]) -> dict[str, float]:
    """Fraction of images whose attribute the judge reads as the scene's; "scene": all attributes right."""
    pred, want = judge.predict(images), labels(scenes)
    right = {k: pred[k] == want[k] for k in ATTRIBUTES}
    out = {k: float(v.mean()) for k, v in right.items()}
    out["scene"] = float(np.logical_and.reduce(list(right.values())).mean())
    return out


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D).

    The trace of sqrt(S_a S_b) is the sum of sqrt eigenvalues of sqrt(S_a) S_b sqrt(S_a) (symmetric PSD),
    so numpy's eigh suffices: no scipy on the device."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a)
    tr = np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + tr)


def load_judge(weights_dir: Path | str, device: str | torch.device = "cpu") -> Judge:
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir)
    cfg = json.loads((weights_dir / "config.json").read_text())["judge"]
    judge = Judge(**cfg)
    judge.load_state_dict(load_file(str(weights_dir / "judge.safetensors")))
    return judge.to(device).eval()
