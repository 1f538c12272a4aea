"""Which INT8 recipe the shapes benchmark ranks best, i.e. what `trtkit calibrate`'s defaults should be.

    python3 benchmarks/shapes/defaults.py /tmp/trtkit-shapes/results.json

Rule (issue 18): among the INT8 modes whose all-attributes accuracy is within 2 standard errors of FP32's
(the standard error of the paired difference over the same seeds and captions, which bench.py stores as
`acc_diff_se`), the one with the lowest Fréchet distance on judge features. The same rule over the FP8
modes names the FP8 default. It prints the recipe, the `trtkit calibrate` flags, and where the defaults
live: `Recipe.resolved()` in trtkit/calibration/calibrate.py (level, reduction, SmoothQuant), the
`--reduction`/`--smoothquant` help in trtkit/cli/calibrate.py, docs/calibration.md "Default recipe".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def eligible(results: dict[str, Any], precision: str) -> dict[str, dict[str, Any]]:
    """The modes of `precision` whose accuracy is within 2 s.e. (paired) of FP32's."""
    out = {}
    for name, r in results.items():
        recipe = r.get("recipe")
        if not recipe or recipe["precision"] != precision:
            continue
        if r["acc_diff"] >= -2 * r["acc_diff_se"]:
            out[name] = r
    return out


def best(results: dict[str, Any], precision: str = "int8") -> tuple[str, dict[str, Any]] | None:
    ok = eligible(results, precision)
    if not ok:
        return None
    name = min(ok, key=lambda n: ok[n]["frechet"])
    return name, ok[name]


def paired_se(a: dict[str, Any], b: dict[str, Any]) -> float:
    """s.e. of a Fréchet distance difference from the paired bootstrap replicates (bench.py: same indices)."""
    x, y = np.asarray(a.get("frechet_boot", [])), np.asarray(b.get("frechet_boot", []))
    if len(x) < 2 or len(x) != len(y):  # no replicates: the unpaired bound
        return float((a["frechet_se"] ** 2 + b["frechet_se"] ** 2) ** 0.5)
    return float(np.std(x - y, ddof=1))


def flags(recipe: dict[str, Any]) -> str:
    f = ["--fp8" if recipe["precision"] == "fp8" else "--int8", f"--level {recipe['level']:g}",
         f"--percentile {recipe['percentile']:g}", f"--reduction {recipe['reduction']}"]
    if recipe["precision"] == "int8":
        f.append("--smoothquant" if recipe["smoothquant"] else "--no-smoothquant")
    return " ".join(f)


def summary(doc: dict[str, Any]) -> list[str]:
    results = doc["results"]
    ref = results["FP32"]
    lines = [f"FP32: all-attributes accuracy {ref['accuracy']['all']['acc'] * 100:.2f}% "
             f"(+- {ref['accuracy']['all']['se'] * 100:.2f}), Frechet {ref['frechet']:.3f} +- {ref['frechet_se']:.3f}"]
    for precision in ("int8", "fp8"):
        pick = best(results, precision)
        if pick is None:
            lines.append(f"{precision.upper()}: no mode within 2 s.e. of FP32's accuracy: keep the defaults")
            continue
        name, r = pick
        ok = eligible(results, precision)
        runner = sorted((n for n in ok if n != name), key=lambda n: ok[n]["frechet"])[:1]
        lines.append(f"{precision.upper()} best: {name}: accuracy {r['accuracy']['all']['acc'] * 100:.2f}% "
                     f"(minus FP32 {r['acc_diff'] * 100:+.2f} +- {r['acc_diff_se'] * 100:.2f}), Frechet "
                     f"{r['frechet']:.3f} +- {r['frechet_se']:.3f}; {len(ok)} {precision.upper()} modes eligible")
        if runner:
            o = ok[runner[0]]
            gap, se = o["frechet"] - r["frechet"], paired_se(o, r)
            lines.append(f"  runner-up: {runner[0]} (Frechet {o['frechet']:.3f}; minus the best, paired: {gap:+.3f} "
                         f"+- {se:.3f})" + ("; NOT separated (gap < 2 s.e.)" if gap < 2 * se else ""))
        lines.append(f"  trtkit calibrate {flags(r['recipe'])}")
        lines.append(f"  Recipe fields: {json.dumps(r['recipe'])}")
    lines.append("defaults live in trtkit/calibration/calibrate.py Recipe.resolved() (level, reduction, "
                 "smoothquant), trtkit/cli/calibrate.py help texts, docs/calibration.md 'Default recipe'")
    return lines


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/trtkit-shapes/results.json")
    print("\n".join(summary(json.loads(path.read_text()))))


if __name__ == "__main__":
    main()
