"""How many messages TensorRT(-RTX) sends trtkit's Python logger during one build, by level, and how many
the logger keeps (review finding 7: VERBOSE is dropped first thing, INFO unless --verbose).

    python3 benchmarks/count_trt_log.py UNET.onnx [--backend rtx] [--profile tiny-256]

The ONNX, e.g. the tiny UNet of the tests (seeded random weights):
    python3 -c "from pathlib import Path; from trtkit.tiny import make_tiny_pipeline; \
      from trtkit.exporter import ExportConfig, export; d = make_tiny_pipeline(Path('/tmp/tt_m/model'), seed=0); \
      export(ExportConfig(model_dir=d, component='unet', profile='tiny-256', out_dir=Path('/tmp/tt_m/onnx')))"
"""

from __future__ import annotations

import argparse
import collections
import logging
import tempfile
import time
from pathlib import Path

import trtkit.backend as backend
from trtkit.builder.build import build
from trtkit.builder.config import BuildConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx", type=Path)
    ap.add_argument("--backend", default="rtx")
    ap.add_argument("--profile", default="tiny-256")
    args = ap.parse_args()
    seen: collections.Counter[str] = collections.Counter()
    kept: collections.Counter[str] = collections.Counter()
    keep = backend.keep_message

    def counting(level: int, info_wanted: bool) -> bool:  # the logger looks the filter up at each message
        seen[logging.getLevelName(level)] += 1
        k = keep(level, info_wanted)
        kept[logging.getLevelName(level)] += k
        return k

    backend.keep_message = counting
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        build(BuildConfig(onnx=args.onnx, output=Path(d) / "e.plan", profiles=(args.profile,), precision="fp16",
                          target_cc=("8.9",) if args.backend == "rtx" else (), backend=args.backend, progress=False))
        secs = time.perf_counter() - t0
    names = {"DEBUG": "VERBOSE"}
    print(f"build {secs:.1f} s; messages from {args.backend}: "
          + ", ".join(f"{names.get(k, k)} {v}" for k, v in sorted(seen.items()))
          + "; kept: " + (", ".join(f"{names.get(k, k)} {v}" for k, v in sorted(kept.items()) if v) or "none"))


if __name__ == "__main__":
    main()
