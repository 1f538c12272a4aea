"""FLUX.1-dev-size transformer through trtkit's product path at scale: export -> FP8 L4 Q/DQ -> TensorRT-RTX
build for SM89, with the wall time, peak memory and disk of each stage (issue 15, "Scale").

Stages (`--stages`, in this order; each runs in its own subprocess, so each has its own peak):
  export    FluxTransformer2DModel from the FLUX.1-dev config (`--layers/--single-layers` scale the depth,
            same widths) with seeded random weights made in `--dtype` (default float16) directly on the GPU
            when there is one (no FP32 copy, no CPU init), then trtkit.exporter.export(..., module=) (the
            `trtkit export -c transformer` path, handed the module in memory instead of loading a folder,
            which would cost another 24 GB of disk) to work/onnx/transformer.onnx + .data, no torch check.
            The trace runs at small token counts (`--trace-tokens`): the graph is the same (dynamic axes), the
            trace just finishes sooner. FP16 weights: 2 bytes/param on disk; FP32 would be 48 GB at full size
            and the export stages a second copy, more than the 64 GB disk.
  calib     a calibration file with a synthesized amax (`--amax`, default 8) for every linear and attention
            input the L4 pass quantizes, names from trtkit's own pattern finder on the ONNX structure. Why not
            `trtkit calibrate`: it runs the 12B model over prompts x steps (minutes of GPU, most of the device
            budget); without a file the pass would max-calibrate with onnxruntime on the CPU, hours at this
            size. Ranges do not change the pass's work, and time and memory are the point here.
  quantize  `python -m trtkit quantize work/onnx/transformer.onnx --fp8 --level 4 --calib ...` -> work/q/.
            The unquantized export is then deleted (`--keep-export` keeps it): the build reads only the Q/DQ
            ONNX. The pass's peak RSS is checked against 2x the export's size on disk.
  build     `python -m trtkit build work/q/transformer.onnx --fp8 --backend rtx --target-cc 8.9 -p flux-1024`
            with CUDA_VISIBLE_DEVICES="" (TensorRT-RTX builds ahead of time for the target on the CPU).

Measured per stage: wall seconds and CPU seconds (user + system, from os.wait4: on a shared machine the
better measure of the work); peak RSS from os.wait4 on the stage's process (its ru_maxrss: the
process's own high-water mark, children it waited for included), and a /proc/<pid>/status VmRSS poll every
0.2 s as a cross-check; peak disk of the work folder (allocated blocks, polled) and its size after the stage;
the stage's output size. After every stage the JSON (`--out`) is rewritten and a line appended to the log
(`--log`, default <workdir>/scale.log), so a killed run keeps its finished stages. A stage whose output
exists is skipped (resumable); `--force` reruns.

Usage:  python benchmarks/scale_flux.py --workdir /tmp/scale --out scale.json            (full size, GPU machine)
        python benchmarks/scale_flux.py --layers 1 --single-layers 1 --workdir w --out s.json  (CPU, FLUX widths)
        python benchmarks/scale_flux.py --tiny --layers 1 --single-layers 1 ...          (tiny widths: the test)
        python benchmarks/scale_flux.py --extrapolate w11/scale.json w22/scale.json       (to 19 + 38 blocks)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_dit import FLUX_DEV, random_transformer  # noqa: E402

# FLUX.1-dev's vae/config.json (sizes only): the build reads the latent scale from a pipeline folder's vae/
FLUX_VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
            "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "norm_num_groups": 32,
            "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
            "use_post_quant_conv": False}
STAGES = ("export", "calib", "quantize", "build")


def flux_config(args: argparse.Namespace) -> dict[str, Any]:
    if args.tiny:
        from trtkit.tiny_dit import tiny_dit_config

        cfg = dict(tiny_dit_config("flux")["transformer"])
    else:
        cfg = dict(FLUX_DEV)
    cfg["num_layers"], cfg["num_single_layers"] = args.layers, args.single_layers
    return cfg


def paths(work: Path) -> dict[str, Path]:
    return {"model": work / "model", "export": work / "onnx" / "transformer.onnx", "calib": work / "calib.json",
            "quantize": work / "q" / "transformer.onnx", "build": work / "engine" / "transformer.plan"}


def size_of(onnx_or_file: Path) -> int:
    """A file and its `.data` sidecar, bytes."""
    return sum(p.stat().st_size for p in (onnx_or_file, onnx_or_file.parent / (onnx_or_file.name + ".data"))
               if p.is_file())


def disk_used(work: Path) -> int:
    """Allocated bytes under the work folder (sparse files count what they hold)."""
    total = 0
    for dirpath, _, files in os.walk(work):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass  # a staged file moved or removed while walking
    return total


# --------------------------------------------------------------------------- stages (child processes)

def stage_export(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from diffusers import FluxTransformer2DModel

    from trtkit.exporter import ExportConfig, export

    cfg = flux_config(args)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    tf = random_transformer(FluxTransformer2DModel, cfg, device, dtype)  # 16-bit where they live: no FP32 copy
    if device == "cuda":
        torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in tf.parameters())
    model_dir = paths(work)["model"]
    # a pipeline folder of configs only, the profiles and later stages read sizes from
    tf.save_config(str(model_dir / "transformer"))
    (model_dir / "vae").mkdir(parents=True, exist_ok=True)
    (model_dir / "vae" / "config.json").write_text(json.dumps(FLUX_VAE, indent=1))
    t, s = args.trace_tokens
    shapes = f"hidden_states:1x{t}x{cfg['in_channels']},encoder_hidden_states:1x{s}x{cfg['joint_attention_dim']}," \
             f"img_ids:{t}x3,txt_ids:{s}x3"
    r = export(ExportConfig(model_dir=model_dir, component="transformer", profile="flux-1024",
                            out_dir=paths(work)["export"].parent, shapes=shapes, check=False, external_data=True,
                            dtype=args.dtype), module=tf)
    out = {"device": device, "dtype": args.dtype, "params": n_params, "init_s": round(init_s, 2),
           "export_s": round(r.seconds, 2)}
    if device == "cuda":
        out["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def stage_calib(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import onnx_graphsurgeon as gs

    from trtkit.calibfile import Calibration, save
    from trtkit.graph import patterns, patterns_dit
    from trtkit.graph.onnx_io import load_onnx

    model = load_onnx(paths(work)["export"], external=False)  # structure only
    meta = {p.key: p.value for p in model.metadata_props}
    with patterns.quiet_gs():
        m = patterns_dit.refine(patterns.find(gs.import_onnx(model), patterns.scope_of(meta)), meta)
    acts = {x.module: args.amax for x in (*m.linear, *m.conv)}
    for a in m.attention:
        acts.update({f"{a.module}.{r}": args.amax for r in ("q_bmm", "k_bmm", "v_bmm")})
    save(Calibration(precision="fp8", activations=acts, model={"component": "transformer", "source": "synthesized"},
                     settings={"method": "synthesized", "amax": args.amax}), paths(work)["calib"])
    return {"ranges": len(acts), "summary": m.summary()}


STAGE_FNS = {"export": stage_export, "calib": stage_calib}


def cli_command(stage: str, work: Path, args: argparse.Namespace) -> list[str]:
    p = paths(work)
    if stage == "quantize":
        # --spill-always: the pass writes its 8-bit weights straight to the output's data file, as it does for
        # any source past 2 GB (a full-size FLUX); lowered so that small depths measure the same path
        cli = ["-c", "import trtkit.graph.qdq as q; q.ONNX_PROTO_LIMIT = 0; from trtkit.cli import entry; entry()"] \
            if args.spill_always else ["-m", "trtkit"]
        return [sys.executable, *cli, "quantize", str(p["export"]), "--fp8", "--level", "4",
                "--calib", str(p["calib"]), "-o", str(p["quantize"])]
    return [sys.executable, "-m", "trtkit", "build", str(p["quantize"]), "--fp8", "--backend", "rtx",
            "--target-cc", args.target_cc, "-p", args.profile, "-o", str(p["build"])]


# --------------------------------------------------------------------------- the parent

class Monitor(threading.Thread):
    """Polls the stage process's VmRSS and the work folder's disk use."""

    def __init__(self, pid: int, work: Path, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.work, self.every = pid, work, every
        self.rss = self.disk = 0
        self.done = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.done.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.rss = max(self.rss, int(line.split()[1]) * 1024)
            except OSError:
                pass
            if n % 5 == 0:  # the walk is cheaper than it looks, but no need for it 5x a second
                self.disk = max(self.disk, disk_used(self.work))
            n += 1
            self.done.wait(self.every)


def run_stage(stage: str, args: argparse.Namespace, work: Path, log: Any) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    side = work / f".{stage}.json"
    side.unlink(missing_ok=True)
    if stage in STAGE_FNS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_stage", stage, *sys.argv[1:]]
    else:
        cmd = cli_command(stage, work, args)
    if stage == "build":
        env["CUDA_VISIBLE_DEVICES"] = ""  # TensorRT-RTX builds for --target-cc on the CPU; the GPU stays hidden
    disk0 = disk_used(work)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    mon = Monitor(proc.pid, work)
    mon.start()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    secs = time.perf_counter() - t0
    mon.done.set()
    mon.join()
    out = paths(work)[stage]
    row: dict[str, Any] = {"ok": proc.returncode == 0, "rc": proc.returncode, "seconds": round(secs, 2),
                           "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 2),
                           "peak_rss_bytes": ru.ru_maxrss * 1024, "peak_rss_polled_bytes": mon.rss,
                           "disk_before_bytes": disk0, "disk_peak_bytes": max(mon.disk, disk_used(work)),
                           "output": str(out), "output_bytes": size_of(out) if out.exists() else 0,
                           "command": " ".join(cmd)}
    if side.is_file():
        row.update(json.loads(side.read_text()))
        side.unlink()
    return row


def full_params(cfg: dict[str, Any]) -> int:
    """Parameters of a FLUX config, counted on the meta device (no memory)."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return sum(p.numel() for p in FluxTransformer2DModel(**cfg).parameters())


def extrapolate(files: list[Path]) -> dict[str, Any]:
    """Each stage's metrics as a straight line in the parameter count through the small-depth runs (least
    squares), evaluated at FLUX.1-dev's depth: blocks differ in size, but every stage's work and memory is
    per weight byte (write, read, quantize, parse), and both block kinds are linears of the same widths."""
    import numpy as np

    docs = [json.loads(f.read_text()) for f in files]
    target = full_params(FLUX_DEV)
    out: dict[str, Any] = {"params": target, "from": [str(f) for f in files]}
    for stage in STAGES:
        rows = [(d["stages"]["export"].get("params") or full_params(d["config"]), d["stages"][stage])
                for d in docs if d.get("stages", {}).get(stage, {}).get("ok")]
        if len(rows) < 2:
            continue
        x = np.array([r[0] for r in rows], float)
        pred: dict[str, float] = {}
        for key in ("seconds", "cpu_seconds", "peak_rss_bytes", "output_bytes", "disk_peak_bytes"):
            ys = [r[1].get(key) for r in rows]
            if any(y is None for y in ys):
                continue
            slope, icpt = np.polyfit(x, np.array(ys, float), 1)
            pred[key] = float(slope * target + icpt)
        out[stage] = pred
    return out


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--extrapolate":  # scale_flux.py --extrapolate a.json b.json ...
        print(json.dumps(extrapolate([Path(a) for a in sys.argv[2:]]), indent=1))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=19, help="joint (double) blocks; FLUX.1: 19")
    ap.add_argument("--single-layers", type=int, default=38, help="single-stream blocks; FLUX.1: 38")
    ap.add_argument("--tiny", action="store_true", help="the tiny test widths (trtkit/data/tiny-flux.json)")
    ap.add_argument("--workdir", type=Path, default=Path("scale-work"))
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default <workdir>/scale.json)")
    ap.add_argument("--log", type=Path, default=None, help="progress log (default <workdir>/scale.log)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--trace-tokens", type=int, nargs=2, default=(256, 64), metavar=("IMAGE", "TEXT"),
                    help="token counts of the export's trace (the graph has dynamic axes)")
    ap.add_argument("--amax", type=float, default=8.0, help="synthesized activation amax")
    ap.add_argument("--target-cc", default="8.9")
    ap.add_argument("--profile", default="flux-1024")
    ap.add_argument("--cpu", action="store_true", help="make and trace the model on the CPU even with a GPU")
    ap.add_argument("--spill-always", action="store_true",
                    help="quantize: spill 8-bit weights to disk as past 2 GB, also below (small-depth runs)")
    ap.add_argument("--keep-export", action="store_true", help="keep the unquantized ONNX after quantize")
    ap.add_argument("--force", action="store_true", help="rerun stages whose output exists")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_stage", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.workdir.resolve()

    if args._stage:  # a child: run one stage, leave its extra numbers for the parent
        extra = STAGE_FNS[args._stage](args, work)
        (work / f".{args._stage}.json").write_text(json.dumps(extra))
        return 0

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage {bad[0]}; stages are {', '.join(STAGES)}")
    work.mkdir(parents=True, exist_ok=True)
    out_json = args.out or work / "scale.json"
    log_path = args.log or work / "scale.log"
    doc: dict[str, Any] = json.loads(out_json.read_text()) if out_json.is_file() else {}
    doc.update({"config": flux_config(args), "dtype": args.dtype, "target_cc": args.target_cc,
                "cpus": os.cpu_count(), "host": os.uname().nodename})
    results = doc.setdefault("stages", {})
    p = paths(work)
    failed = False
    with open(log_path, "a", buffering=1) as log:
        for stage in stages:
            later = STAGES[STAGES.index(stage) + 1:]
            done = p[stage].exists() or (stage == "export" and any(p[s].exists() for s in ("quantize", "build")))
            if done and not args.force:
                log.write(f"[scale] {stage}: output exists, skipped\n")
                continue
            log.write(f"[scale] {time.strftime('%H:%M:%S')} {stage} starts\n")
            row = run_stage(stage, args, work, log)
            if stage == "quantize" and row["ok"]:
                src = size_of(p["export"])
                row["input_bytes"] = src
                row["peak_over_input"] = round(row["peak_rss_bytes"] / src, 3) if src else None
                row["peak_under_2x_input"] = row["peak_rss_bytes"] < 2 * src
                if not args.keep_export:  # the build reads the Q/DQ ONNX only: give the disk back
                    for f in (p["export"], p["export"].parent / (p["export"].name + ".data")):
                        f.unlink(missing_ok=True)
            row["disk_after_bytes"] = disk_used(work)
            results[stage] = row
            out_json.write_text(json.dumps(doc, indent=1) + "\n")
            gb = 1e9
            status = "ok" if row["ok"] else f"FAILED rc={row['rc']}"
            log.write(f"[scale] {time.strftime('%H:%M:%S')} {stage} {status} "
                      f"{row['seconds']:.1f} s, peak RSS {row['peak_rss_bytes'] / gb:.2f} GB, output "
                      f"{row['output_bytes'] / gb:.2f} GB, disk peak {row['disk_peak_bytes'] / gb:.2f} GB\n")
            if not row["ok"]:
                failed = True
                if later:
                    log.write(f"[scale] stopping: {', '.join(later)} need {stage}\n")
                break
    print(json.dumps({k: {kk: v[kk] for kk in ("ok", "seconds", "peak_rss_bytes", "output_bytes")}
                      for k, v in results.items()}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
