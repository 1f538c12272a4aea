"""The FP16 pass on real UNet sizes: trtkit's strongly typed pass (trtkit.graph.fp16.convert_fp16) against
ModelOpt's AutoCast (modelopt.onnx.autocast.convert_to_mixed_precision, keep_io_types).

Per size it exports a UNet built from the published config with seeded random weights (no download),
at a small latent (the spatial size does not change the pass's work, only the error check's), then runs
each pass in its own child process and reports wall time, peak RSS (the child's ru_maxrss), the
onnxruntime error against the FP32 ONNX (max |out - ref| / max |ref|, CPU provider) and, where
tensorrt_rtx imports, whether `trtkit build --backend rtx` builds the output (ahead of time for SM 8.9,
opt level 0; RTX does not target Hopper, so the H200 machine builds for 8.9 like this one).

    python3 benchmarks/bench_fp16.py --size tiny --out /tmp/bench-fp16          # the check here
    python3 benchmarks/bench_fp16.py --size sd15 --out $OUT                     # the GPU machine
    python3 benchmarks/bench_fp16.py --size sdxl --out $OUT --no-build

Writes `<out>/bench_fp16.<size>.json` (`--tag` names it apart); the work files (GBs for sdxl) go to
--work, where the FP32 export stays for the next call (default: a temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LATENT = {"tiny": 32, "sd15": 32, "sdxl": 32}


def unet_config(size: str) -> dict[str, Any]:
    if size == "tiny":
        from trtkit.tiny import tiny_config

        return tiny_config()["unet"]
    sys.path.insert(0, str(HERE))
    from _configs import SD15_UNET, SDXL_UNET  # type: ignore[import-not-found]

    return dict(SD15_UNET if size == "sd15" else SDXL_UNET)


def shapes_of(cfg: dict[str, Any], latent: int) -> str:
    ctx = cfg.get("cross_attention_dim", 768)
    s = f"sample:2x4x{latent}x{latent},timestep:1,encoder_hidden_states:2x77x{ctx}"
    if cfg.get("addition_embed_type") == "text_time":
        emb = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        s += f",text_embeds:2x{emb},time_ids:2x6"
    return s


def export(size: str, work: Path, latent: int) -> tuple[Path, str]:
    import torch
    from diffusers import UNet2DConditionModel

    from trtkit.exporter import ExportConfig
    from trtkit.exporter import export as do_export

    cfg = unet_config(size)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg)
    unet.save_pretrained(str(work / "model" / "unet"), safe_serialization=True)
    del unet
    shapes = shapes_of(cfg, latent)
    r = do_export(ExportConfig(model_dir=work / "model", component="unet", profile=None, shapes=shapes,
                               out_dir=work / "onnx", check=False))
    shutil.rmtree(work / "model")
    return r.path, shapes


def child(method: str, src: str, dest: str, calib: str) -> None:
    """One pass, in a process of its own so that its peak RSS is its own."""
    if method == "trtkit":
        from trtkit.graph.fp16 import convert_fp16

        convert_fp16(src, dest)
        return
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    # AutoCast runs the model in onnxruntime to find ranges; without data it draws the dynamic dims itself
    # (and the UNet's skip Concats then disagree), so it gets inputs of the export's shapes.
    model = convert_to_mixed_precision(onnx_path=src, low_precision_type="fp16", keep_io_types=True,
                                       calibration_data=calib)
    big = model.ByteSize() > 2_000_000_000 if hasattr(model, "ByteSize") else True
    onnx.save(model, dest, save_as_external_data=big, all_tensors_to_one_file=True,
              location=Path(dest).name + ".data")


def run_pass(method: str, src: Path, dest: Path, calib: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, __file__, "--child", method, str(src), str(dest), str(calib)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    out = p.stdout.read() if p.stdout else ""
    p.returncode = os.waitstatus_to_exitcode(status)
    res: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 1),
                           "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "ok": p.returncode == 0}
    hwm = [ln.split()[1] for ln in out.splitlines() if ln.startswith("PEAK_RSS_KIB ")]
    if hwm:  # the pass's own peak (VmHWM); ru_maxrss above is an upper bound that includes the parent's RSS
        res["peak_rss_gib"], res["ru_maxrss_gib"] = round(int(hwm[-1]) / 2**20, 2), res["peak_rss_gib"]
    if p.returncode:
        res["error"] = out.strip().splitlines()[-1][:300] if out.strip() else f"exit {p.returncode}"
    return res


def ort_error(path: Path, feeds: dict[str, Any], ref: Any) -> float:
    import numpy as np

    from trtkit.exporter import run_onnxruntime

    out = run_onnxruntime(path, feeds)[0].astype(np.float32)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def rtx_build(path: Path, shapes: str, timeout: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "trtkit", "build", str(path), "--backend", "rtx", "--shapes",
                            shapes, "--opt-level", "0", "--target-cc", "8.9", "-o", str(path.with_suffix(".plan"))],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"no result within {timeout} s"}
    res: dict[str, Any] = {"ok": p.returncode == 0, "seconds": round(time.perf_counter() - t0, 1)}
    if p.returncode:
        res["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
        # The child's own high-water mark: ru_maxrss from wait4 keeps the parent's RSS at fork (Linux carries
        # it across exec), which after an in-process export is the export's peak, not the pass's.
        hwm = next(ln.split()[1] for ln in Path("/proc/self/status").read_text().splitlines()
                   if ln.startswith("VmHWM:"))
        print(f"PEAK_RSS_KIB {hwm}", flush=True)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=("tiny", "sd15", "sdxl"), default="tiny")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench-fp16")))
    ap.add_argument("--work", type=Path, default=None,
                    help="where the ONNX files go and stay, an export there is reused (default: a temp folder)")
    ap.add_argument("--methods", default="trtkit,autocast")
    ap.add_argument("--tag", default="", help="suffix of the JSON name")
    ap.add_argument("--build", action=argparse.BooleanOptionalAction, default=None,
                    help="build each output with TensorRT-RTX (default: when tensorrt_rtx imports)")
    ap.add_argument("--build-timeout", type=int, default=240)
    args = ap.parse_args()
    import importlib.util

    import numpy as np

    build = args.build if args.build is not None else importlib.util.find_spec("tensorrt_rtx") is not None
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-fp16-", dir=os.environ.get("TMPDIR")))
    work.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_fp16.{args.size}{args.tag}.json"
    report: dict[str, Any] = {"size": args.size, "latent": LATENT[args.size], "machine": os.uname().nodename,
                              "cpus": os.cpu_count()}
    try:
        t0 = time.perf_counter()
        kept = work / "onnx" / "unet.onnx"
        if args.work is not None and kept.is_file():  # an earlier call's export (--work keeps it)
            src, shapes = kept, shapes_of(unet_config(args.size), LATENT[args.size])
            report["export_reused"] = True
        else:
            src, shapes = export(args.size, work, LATENT[args.size])
        report["export_seconds"] = round(time.perf_counter() - t0, 1)
        report["onnx_bytes"] = sum(f.stat().st_size for f in src.parent.iterdir())
        report["export_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        print(f"exported {args.size}: {report['onnx_bytes'] / 2**30:.2f} GiB in {report['export_seconds']} s",
              flush=True)
        from trtkit.exporter import example_inputs
        from trtkit.profiles import apply_overrides

        feeds = example_inputs(apply_overrides(None, shapes=shapes), "opt", seed=1)
        feeds = {k: np.asarray(v, dtype=np.float32) for k, v in feeds.items()}
        from trtkit.exporter import run_onnxruntime

        ref = run_onnxruntime(src, feeds)[0]
        # AutoCast's range run: other inputs than the error check's. A folder of .npz files is a list of
        # whole batches to it; a single .npz would be split along the first axis.
        calib = work / "calib"
        calib.mkdir(exist_ok=True)
        np.savez(calib / "batch0.npz", **{k: np.asarray(v, dtype=np.float32) for k, v in
                           example_inputs(apply_overrides(None, shapes=shapes), "opt", seed=0).items()})
        for method in args.methods.split(","):
            dest = work / f"unet.{method}.onnx"
            r = run_pass(method, src, dest, calib)
            if r["ok"]:
                r["ort_error"] = ort_error(dest, feeds, ref)
                if build:
                    r["rtx_build"] = rtx_build(dest, shapes, args.build_timeout)
            report[method] = r
            print(method, json.dumps(r), flush=True)
            path.write_text(json.dumps(report, indent=1) + "\n")  # each method as it ends: a timeout keeps it
            for f in work.glob(f"unet.{method}.*"):
                f.unlink()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
