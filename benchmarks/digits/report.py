"""Markdown table from a bench.py output folder: accuracy +- standard error, latent RMSE to FP32 +- its
standard error over samples, and paired RMSE differences against INT8 max calibration (same noise).

    python3 benchmarks/digits/report.py /tmp/trtkit-digits
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/trtkit-digits")
    doc = json.loads((out / "results.json").read_text())
    ref = np.load(out / "samples_FP32.npy")

    def rmse(mode: str) -> np.ndarray:
        x = np.load(out / f"samples_{mode.replace(' ', '_').replace('/', '')}.npy")
        return np.sqrt(((x - ref) ** 2).mean(axis=(1, 2, 3)))

    base = rmse("INT8 max") if "INT8 max" in doc["results"] else None
    print("| mode | accuracy | std. error | latent RMSE to FP32 | RMSE minus INT8 max (paired) |")
    print("|---|---|---|---|---|")
    for mode, r in doc["results"].items():
        e = rmse(mode)
        se = e.std(ddof=1) / np.sqrt(len(e))
        paired = ""
        if base is not None and mode not in ("INT8 max", "FP32"):
            d = e - base
            paired = f"{d.mean():+.4f} +- {d.std(ddof=1) / np.sqrt(len(d)):.4f}"
        print(f"| {mode} | {r['accuracy'] * 100:.2f}% | {r['se'] * 100:.2f} | {e.mean():.4f} +- {se:.4f} | {paired} |")
    print(f"\n{json.dumps(doc['meta'])}")


if __name__ == "__main__":
    main()
