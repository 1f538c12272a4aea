"""Build time and peak memory of an SD 1.5-architecture UNet (~860 M parameters, seeded random
weights) with TensorRT-RTX on the CPU, per precision, each build in its own process.

    flock /tmp/trtkit-heavy.lock python3 benchmarks/bench_build.py --work /tmp/bench-build \
        --precisions fp32 fp16 int8 --out docs/bench/builder-results.json

FP32 is the baseline (no graph pass). FP16 includes the strongly typed FP16 conversion, INT8 the
Q/DQ pass (ranges from the pass's own sample run: an empty calibration file) plus FP16 for the rest.
Needs ~11 GB RAM at peak (run it under the heavy-job lock).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _configs import SD15_UNET  # benchmarks/ is on sys.path when run as a script


def make_model(work: Path) -> Path:
    model_dir = work / "sd15-random"
    if (model_dir / "unet" / "config.json").is_file():
        return model_dir
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    unet.save_pretrained(model_dir / "unet")
    return model_dir


def export_onnx(model_dir: Path, work: Path) -> tuple[Path, float, int]:
    onnx_dir = work / "onnx"
    dest = onnx_dir / "unet.onnx"
    params = work / "params.txt"  # the export's parameter count, kept for reruns that reuse the ONNX
    if dest.is_file() and params.is_file():
        return dest, float("nan"), int(params.read_text())
    from trtkit.exporter import ExportConfig, export

    r = export(ExportConfig(model_dir=model_dir, component="unet", profile="sd15-512", out_dir=onnx_dir,
                            external_data=True, check=False))
    params.write_text(str(r.num_params))
    return r.path, r.seconds, r.num_params


def one_build(onnx: Path, out: Path, precision: str, calib: Path | None, target: str, profile: str) -> dict:
    """Run in a child process: one build, result as JSON on stdout."""
    from trtkit.builder.build import build
    from trtkit.builder.config import BuildConfig

    r = build(BuildConfig(onnx=onnx, output=out, profiles=(profile,), precision=precision, calib=calib,
                          target_cc=(target,), backend="rtx", force=True, progress=False))
    return {"precision": precision, "wall_seconds": r.seconds, "trt_build_seconds": r.build_seconds,
            "plan_bytes": r.plan.stat().st_size, "notes": r.notes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-build"))
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "int8"])
    ap.add_argument("--target", default="8.9")
    ap.add_argument("--profile", default="sd15-512")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", nargs=4, metavar=("ONNX", "OUT", "PRECISION", "CALIB"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        onnx, out, prec, calib = a.child
        res = one_build(Path(onnx), Path(out), prec, Path(calib) if calib != "-" else None, a.target, a.profile)
        print("RESULT " + json.dumps(res))
        return

    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = make_model(a.work)
    onnx, export_s, n_params = export_onnx(model_dir, a.work)
    print(f"model + export ready in {time.perf_counter() - t0:.0f} s (export {export_s:.0f} s)", flush=True)
    from trtkit.calibfile import Calibration, save

    calib = save(Calibration(precision="int8", settings={"note": "empty: the Q/DQ pass measures ranges itself"}),
                 a.work / "calib-empty.json")
    import tensorrt_rtx

    import trtkit

    rows = []
    for prec in a.precisions:
        out = a.work / "engines" / f"unet-{prec}.plan"
        cmd = [sys.executable, __file__, "--target", a.target, "--profile", a.profile, "--child", str(onnx), str(out),
               prec, str(calib) if prec == "int8" else "-"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        stdout = p.stdout.read() if p.stdout else ""
        p.returncode = os.waitstatus_to_exitcode(status)
        line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            print(f"{prec}: failed (exit {p.returncode})", flush=True)
            rows.append({"precision": prec, "failed": True})
            continue
        row = json.loads(line[7:]) | {"peak_rss_gib": usage.ru_maxrss / 2**20}
        rows.append(row)
        print(f"{prec}: {row['wall_seconds']:.1f} s total, TensorRT build {row['trt_build_seconds']:.1f} s, "
              f"plan {row['plan_bytes'] / 2**30:.2f} GiB, peak RSS {row['peak_rss_gib']:.1f} GiB", flush=True)
    data_bytes = sum(f.stat().st_size for f in onnx.parent.glob("unet.onnx*"))
    result = {"model": "SD 1.5-architecture UNet, random weights", "params": n_params or None,
              "onnx_bytes": data_bytes, "profile": a.profile, "target": a.target,
              "tensorrt_rtx": tensorrt_rtx.__version__, "trtkit": trtkit.__version__,
              "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "rows": rows,
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(json.dumps(result, indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
