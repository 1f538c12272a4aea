"""Time and peak memory of the Q/DQ pass on an SD 1.5-architecture UNet (~860 M parameters, seeded
random weights), against the ONNX export of the same model; each step in its own process.

    flock /tmp/trtkit-heavy.lock python3 benchmarks/bench_quantize.py --work /tmp/bench-graph \
        --out docs/bench/graph-results.json [--max-calib]

Steps: make the model (diffusers UNet2DConditionModel with the SD 1.5 config below, saved), export it
(trtkit exporter, sd15-512, external data, no torch check), write a calibration file naming every
matched module (fixed ranges: the pass's cost does not depend on the values), then the pass:
INT8 level 3 and FP8 level 4 with that file (+ FP16 elsewhere), and with --max-calib INT8 level 3
with ranges from its own onnxruntime run at the sd15-512 opt shapes. Targets: < 60 s, peak RSS
< 2x the model's size.
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

# --------------------------------------------------------------------------- steps (child processes)

def step_model(work: Path) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    n = sum(p.numel() for p in unet.parameters())
    unet.save_pretrained(work / "sd15-random" / "unet")
    return {"params": n}


def step_export(work: Path) -> dict:
    from trtkit.exporter import ExportConfig, export

    r = export(ExportConfig(model_dir=work / "sd15-random", component="unet", profile="sd15-512",
                            out_dir=work / "onnx", external_data=True, check=False))
    return {"path": str(r.path), "params": r.num_params}


def step_calib(work: Path) -> dict:
    import onnx
    import onnx_graphsurgeon as gs

    from trtkit.calibfile import ATTENTION_INPUTS, Calibration, save
    from trtkit.graph import patterns

    model = onnx.load(str(work / "onnx" / "unet.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    with patterns.quiet_gs():
        m = patterns.find(gs.import_onnx(model), patterns.scope_of(meta))
    acts = {x.module: 4.0 for x in (*m.linear, *m.conv)}
    acts |= {f"{a.module}.{r}": 4.0 for a in m.attention for r in ATTENTION_INPUTS}
    save(Calibration(precision="int8", activations=acts, settings={"note": "fixed ranges for timing"}),
         work / "calib.json")
    return {"matches": m.summary()}


def step_quantize(work: Path, precision: str, level: float, calib: bool) -> dict:
    from trtkit.graph.qdq import QuantizeConfig, quantize

    out = work / "q" / f"unet.{precision}.l{level:g}{'' if calib else '.maxcal'}.onnx"
    r = quantize(QuantizeConfig(onnx_path=work / "onnx" / "unet.onnx", output=out, precision=precision, level=level,
                                calib=work / "calib.json" if calib else None, profile="sd15-512"))
    size = sum(f.stat().st_size for f in out.parent.glob(out.name + "*"))
    return {"summary": r.summary(), "pairs": r.qdq_pairs, "out_bytes": size, "calibration": r.calibration,
            "notes": r.notes}


STEPS = {"model": step_model, "export": step_export, "calib": step_calib}


def child(work: Path, name: str, args: list[str]) -> None:
    t0 = time.perf_counter()
    if name == "quantize":
        res = step_quantize(work, args[0], float(args[1]), args[2] == "calib")
    else:
        res = STEPS[name](work)
    print("RESULT " + json.dumps(res | {"seconds": time.perf_counter() - t0}), flush=True)


def run_step(work: Path, name: str, *args: str) -> dict:
    cmd = [sys.executable, __file__, "--work", str(work), "--child", name, *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    out = p.stdout.read() if p.stdout else ""
    code = os.waitstatus_to_exitcode(status)
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if code != 0 or line is None:
        raise SystemExit(f"step {name} {' '.join(args)} failed (exit {code})")
    return json.loads(line[7:]) | {"peak_rss_gib": usage.ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-graph"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--max-calib", action="store_true", help="also time INT8 with its own sample-run calibration")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.work, a.child[0], a.child[1:])
        return
    a.work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    if not (a.work / "sd15-random" / "unet" / "config.json").is_file():
        rows["model"] = run_step(a.work, "model")
        print(f"model: {rows['model']['params'] / 1e6:.0f} M parameters in {rows['model']['seconds']:.0f} s", flush=True)
    rows["export"] = run_step(a.work, "export")
    print(f"export: {rows['export']['seconds']:.1f} s, peak RSS {rows['export']['peak_rss_gib']:.2f} GiB", flush=True)
    rows["calib"] = run_step(a.work, "calib")
    runs = [("int8", "3", "calib"), ("fp8", "4", "calib")] + ([("int8", "3", "max")] if a.max_calib else [])
    for prec, level, cal in runs:
        key = f"{prec} L{level} ({'calibration file' if cal == 'calib' else 'max calibration run'})"
        rows[key] = run_step(a.work, "quantize", prec, level, cal)
        r = rows[key]
        print(f"{key}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB, output "
              f"{r['out_bytes'] / 2**30:.2f} GiB; {r['summary']}", flush=True)
    onnx_dir = a.work / "onnx"
    model_bytes = sum(f.stat().st_size for f in onnx_dir.glob("unet.onnx*"))
    import numpy
    import onnx
    import onnxruntime

    result = {"model": "SD 1.5-architecture UNet2DConditionModel, seeded random weights",
              "params": rows["export"]["params"], "onnx_bytes": model_bytes, "steps": rows,
              "versions": {"python": platform.python_version(), "onnx": onnx.__version__,
                           "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__},
              "cpu": f"{os.cpu_count()} cores, {platform.machine()}"}
    print(json.dumps(result, indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
