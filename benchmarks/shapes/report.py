"""Markdown tables for docs/calibration.md from a bench.py results.json.

    python3 benchmarks/shapes/report.py /tmp/trtkit-shapes/results.json > /tmp/shapes-table.md

Table 1: all-attributes accuracy, its paired difference to FP32 (same seeds and captions), Fréchet
distance on judge features against real renders and its paired difference to FP32 (same bootstrap
resamples), PSNR and SSIM against the FP32 image of the same seed,
each +- its standard error; the modes defaults.py picks are in bold. Table 2: accuracy per attribute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks.shapes` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.shapes import defaults  # noqa: E402


def pm(v: float, se: float, digits: int, scale: float = 1.0) -> str:
    return f"{v * scale:.{digits}f} +- {se * scale:.{digits}f}"


def tables(doc: dict[str, Any]) -> str:
    res, meta = doc["results"], doc["meta"]
    picks = {p[0] for p in (defaults.best(res, "int8"), defaults.best(res, "fp8")) if p}
    out = ["| mode | all attributes (%) | minus FP32, paired (points) | Fréchet distance | minus FP32, paired "
           "| PSNR to FP32 (dB) | SSIM to FP32 |", "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        a = r["accuracy"]["all"]
        paired = "" if name == "FP32" else pm(r["acc_diff"], r["acc_diff_se"], 2, 100)
        fd_paired = "" if name == "FP32" else pm(r["frechet_diff"], r["frechet_diff_se"], 3)
        psnr = pm(r["psnr"], r["psnr_se"], 2) if "psnr" in r else "(reference)"
        ssim = pm(r["ssim"], r["ssim_se"], 4) if "ssim" in r else "(reference)"
        label = f"**{name}**" if name in picks else name
        out.append(f"| {label} | {pm(a['acc'], a['se'], 2, 100)} | {paired} | {pm(r['frechet'], r['frechet_se'], 3)} "
                   f"| {fd_paired} | {psnr} | {ssim} |")
    attrs = [k for k in next(iter(res.values()))["accuracy"] if k != "all"]
    out += ["", "| mode | " + " | ".join(f"{a} (%)" for a in attrs) + " |", "|---|" + "---|" * len(attrs)]
    for name, r in res.items():
        out.append(f"| {name} | " + " | ".join(pm(r["accuracy"][a]["acc"], r["accuracy"][a]["se"], 2, 100)
                                             for a in attrs) + " |")
    jr = meta["judge_real"]["all"]
    out += ["", f"{meta['samples']} samples per mode, {meta['steps']} DDIM steps, guidance {meta['guidance']:g}, "
            f"calibration {meta['calib_captions']} captions in batches of {meta['calib_batch']} (other seeds), "
            f"{meta['boot']} bootstrap resamples; {meta['device_name']}, torch {meta['torch']}, "
            f"{meta['total_seconds']:.0f} s in all. Judge on the real renders of the same captions: "
            f"{jr['acc'] * 100:.2f}% all attributes; Fréchet distance between two real render sets "
            f"(the floor): {meta['frechet_real_floor']:.3f} +- {meta['frechet_real_floor_se']:.3f}."]
    return "\n".join(out)


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/trtkit-shapes/results.json")
    print(tables(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
