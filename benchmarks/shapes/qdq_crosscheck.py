"""Fake quantization against the real Q/DQ graph: the shapes UNet exported with trtkit's exporter, quantized
by trtkit's graph pass with bench.py's calibration file, run in onnxruntime through the whole guided DDIM
loop, compared with the same loop in torch fake quantization (trtkit.calibration.fakequant) and in FP32.

    python3 benchmarks/shapes/bench.py ... --out /tmp/trtkit-shapes          # writes calib_<mode>.json
    python3 benchmarks/shapes/qdq_crosscheck.py --weights benchmarks/shapes/weights --calib-dir /tmp/trtkit-shapes

onnxruntime runs the Q/DQ graph with graph optimisations off (QuantizeLinear/DequantizeLinear evaluated as
written, no integer kernels), so "Q/DQ" and "fake" differ by what the graph pass does differently from
fakequant (scales, which inputs, SmoothQuant folding) and by float summation order. The latter alone does
not give equal outputs through a whole UNet: a float-noise rounding flip in one quantizer changes the inputs
of the next ones, so the two runs' rounding noise decorrelates along the chain (docs/benchmarks.md,
"Cross-check: fake quantization vs the graph pass's Q/DQ ONNX"; per-module agreement is
tests/calibration/test_fakequant.py). What the benchmark relies on is that fake quantization has the *size*
of the real quantization error, so the check is: RMSE(Q/DQ, FP32) / RMSE(fake, FP32) within 1 +- `--tolerance`
over the sampled images, for every mode; PSNR to FP32 of both is reported as the benchmark reports it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a script: make `benchmarks.shapes` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from benchmarks import quality_modes as qm
from benchmarks.shapes import metrics, render
from benchmarks.shapes import model as M
from benchmarks.shapes.bench import load, to_tensor
from trtkit import calibfile
from trtkit.calibration import fakequant

if TYPE_CHECKING:
    from trtkit.graph.qdq import QuantizeResult


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean().sqrt())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def finite(p: torch.Tensor) -> torch.Tensor:
    return p[torch.isfinite(p)] if torch.isfinite(p).any() else torch.zeros(2)


def ratio_se(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, boot: int = 1000, seed: int = 0
             ) -> tuple[float, float]:
    """RMSE(a, ref) / RMSE(b, ref) over images and its bootstrap standard error (images resampled, paired).
    The image errors are heavy-tailed (a few samples change composition), so 16 images leave it wide."""
    ea = ((a - ref) ** 2).flatten(1).mean(1).double()
    eb = ((b - ref) ** 2).flatten(1).mean(1).double()
    r = float((ea.mean() / eb.mean().clamp_min(1e-30)).sqrt())
    idx = torch.from_numpy(np.random.default_rng(seed).integers(0, len(ea), (boot, len(ea))))
    rs = (ea[idx].mean(1) / eb[idx].mean(1).clamp_min(1e-30)).sqrt()
    return r, float(rs.std())


class OrtUNet(torch.nn.Module):
    """An onnxruntime UNet behind the diffusers call model.sample makes: unet(x, t, encoder_hidden_states=)."""

    def __init__(self, path: Path, optimize: bool = False) -> None:
        super().__init__()
        import onnxruntime as ort

        so = ort.SessionOptions()
        # Q/DQ as written; `optimize` lets ORT's CPU optimizer run (its QDQ propagation and fusions)
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self._device = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # model.sample reads the device

    def forward(self, sample: torch.Tensor, t: Any, encoder_hidden_states: torch.Tensor) -> Any:
        feeds = {"sample": sample.float().cpu().numpy(),
                 "timestep": np.array([float(t)], np.float32),
                 "encoder_hidden_states": encoder_hidden_states.float().cpu().numpy()}
        out = torch.from_numpy(self.sess.run(None, feeds)[0]).to(sample.device)
        return type("Out", (), {"sample": out})()


def export(unet: Any, folder: Path, batch: int) -> Path:
    from trtkit.exporter import ExportConfig
    from trtkit.exporter import export as trt_export

    unet.save_pretrained(folder / "model" / "unet")
    tokens, dim = M.MAX_TOKENS, unet.config.cross_attention_dim
    c, s = unet.config.in_channels, unet.config.sample_size
    res = trt_export(ExportConfig(model_dir=folder / "model", component="unet", profile=None, out_dir=folder / "onnx",
                                  shapes=f"sample:{2 * batch}x{c}x{s}x{s},timestep:1,"
                                         f"encoder_hidden_states:{2 * batch}x{tokens}x{dim}"))
    return res.path


def quantized_modes(onnx_path: Path, folder: Path, calib_dir: Path, modes: str
                    ) -> Iterator[tuple[str, Path, calibfile.Calibration, QuantizeResult]]:
    """For each ';'-separated bench mode: its name, bench.py's calibration file for it (path and loaded) and
    the Q/DQ ONNX trtkit's graph pass makes from `onnx_path` with that file, written into `folder`."""
    from trtkit.graph.qdq import QuantizeConfig, quantize

    for name in [m.strip() for m in modes.split(";") if m.strip()]:
        path = calib_dir / f"calib_{qm.file_name(name)}.json"
        cal = calibfile.load(path)
        q = quantize(QuantizeConfig(onnx_path=onnx_path, output=folder / f"{qm.file_name(name)}.onnx",
                                    calib=path, precision=cal.precision, level=cal.settings["level"],
                                    fp16=False))
        yield name, path, cal, q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=Path(__file__).resolve().parent / "weights")
    ap.add_argument("--untrained", action="store_true")
    ap.add_argument("--calib-dir", type=Path, default=Path("/tmp/trtkit-shapes"), help="bench.py's --out")
    ap.add_argument("--modes", default="INT8 mean;INT8 mean + SQ;INT8 max", help="';'-separated bench modes")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.15,
                    help="pass when RMSE(Q/DQ, FP32) / RMSE(fake, FP32) is within 1 +- this for every mode")
    ap.add_argument("--control", action="store_true",
                    help="also rerun fake quantization with conv_in's bias moved by 1 ulp: how far float noise "
                         "alone moves the ratio")
    ap.add_argument("--ort-optimize", action="store_true", help="run onnxruntime with its graph optimizations on")
    ap.add_argument("--out", type=Path, default=None, help="JSON summary (default: <calib-dir>/qdq_crosscheck.json)")
    args = ap.parse_args()
    args.device = "cpu"  # the comparison runs where onnxruntime runs
    unet, text_encoder, _, source = load(args)
    ev = render.sample_scenes(args.images, np.random.default_rng(args.seed + 30_000))
    caps, seeds = [render.caption(s) for s in ev], np.arange(args.images) + 3_000_000

    def run(model: Any) -> torch.Tensor:
        return to_tensor(M.sample(model, text_encoder, caps, seeds, args.steps, args.guidance, batch_size=args.images))

    fp32 = run(unet)
    # one UNet call on the same inputs (guidance batch of the first step): the sharpest comparison
    x_in = torch.cat([M.seeded_noise(seeds)] * 2)
    with torch.no_grad():
        enc = torch.cat([M.encode(text_encoder, [""] * len(caps)), M.encode(text_encoder, caps)])
    out: dict[str, Any] = {"weights": source, "images": args.images, "steps": args.steps,
                           "ort_optimize": args.ort_optimize, "modes": {}}
    ok = True
    with tempfile.TemporaryDirectory(prefix="shapes-qdq-") as tmp:
        t0 = time.time()
        onnx_path = export(unet, Path(tmp), args.images)
        print(f"exported {onnx_path.name} ({time.time() - t0:.1f} s)", flush=True)
        for name, path, cal, q in quantized_modes(onnx_path, Path(tmp), args.calib_dir, args.modes):
            ort_unet = OrtUNet(q.path, args.ort_optimize)
            with torch.no_grad():
                with fakequant.quantized(unet, cal):
                    fake = run(unet)
                    eps_fake = unet(x_in, 500, encoder_hidden_states=enc).sample
                eps_fp32 = unet(x_in, 500, encoder_hidden_states=enc).sample
                eps_qdq = ort_unet(x_in, 500, encoder_hidden_states=enc).sample
            real = run(ort_unet)
            control = None
            if args.control:  # fake quantization again, after a float-noise change (1 ulp of conv_in's bias)
                with torch.no_grad():
                    bias = unet.conv_in.bias.detach().clone()
                    unet.conv_in.bias.copy_(torch.nextafter(bias, torch.full_like(bias, float("inf"))))
                    try:
                        with fakequant.quantized(unet, cal):
                            control = run(unet)
                    finally:
                        unet.conv_in.bias.copy_(bias)

            r: dict[str, Any] = {"calibration": str(path), "qdq_pairs": q.qdq_pairs, "calibration_source": q.calibration,
                 "rmse_qdq_fake": rmse(real, fake), "rmse_fake_fp32": rmse(fake, fp32),
                 "rmse_qdq_fp32": rmse(real, fp32),
                 "psnr_qdq_vs_fake": metrics.mean_se(finite(metrics.psnr(real, fake))),
                 "one_call_rel_qdq_fake": rel(eps_qdq, eps_fake), "one_call_rel_fake_fp32": rel(eps_fake, eps_fp32),
                 "identical_images": int((real == fake).flatten(1).all(1).sum())}
            # the same inputs quantized on both sides, with the same ranges
            graph = {d.module: d for d in q.decisions if d.quantized}
            torch_side = fakequant.targets_of(cal, unet)
            r["only_in_graph"] = sorted(set(graph) - set(torch_side))
            r["only_in_torch"] = sorted(set(torch_side) - set(graph))
            r["amax_mismatches"] = sorted(k for k, d in graph.items() if k in cal.activations and d.amax is not None
                                          and abs(d.amax - cal.activations[k]) > 1e-6 * cal.activations[k])
            r["psnr_qdq_fp32"] = metrics.mean_se(finite(metrics.psnr(real, fp32)))
            r["psnr_fake_fp32"] = metrics.mean_se(finite(metrics.psnr(fake, fp32)))
            # paired per image (log scale: less heavy-tailed than the RMSE ratio); images equal to FP32 left out
            pd = metrics.psnr(real, fp32) - metrics.psnr(fake, fp32)
            r["psnr_diff_qdq_minus_fake"] = metrics.mean_se(pd[torch.isfinite(pd)] if torch.isfinite(pd).sum() > 1
                                                            else torch.zeros(2))
            r["ratio"], r["ratio_se"] = ratio_se(real, fake, fp32, seed=args.seed)
            if control is not None:
                r["control_ratio"], r["control_ratio_se"] = ratio_se(control, fake, fp32, seed=args.seed)
                r["rmse_control_fake"] = rmse(control, fake)
            r["one_call_rel_qdq_fp32"] = rel(eps_qdq, eps_fp32)
            r["one_call_ratio"] = r["one_call_rel_qdq_fp32"] / max(r["one_call_rel_fake_fp32"], 1e-12)
            # The one-call ratio is the sharp test (no trajectory to diverge); the loop's image ratio has to
            # agree within the tolerance or, where a few images dominate it, within 2 standard errors.
            r["pass"] = (abs(r["one_call_ratio"] - 1) <= args.tolerance
                         and abs(r["ratio"] - 1) <= max(args.tolerance, 2 * r["ratio_se"])
                         and not r["only_in_graph"] and not r["only_in_torch"] and not r["amax_mismatches"])
            ok &= r["pass"]
            out["modes"][name] = r
            control_txt = (f"; control (fake, 1 ulp moved): ratio {r['control_ratio']:.3f} +- "
                           f"{r['control_ratio_se']:.3f}" if "control_ratio" in r else "")
            print(f"{name:20s} RMSE to FP32: Q/DQ-ORT {r['rmse_qdq_fp32']:.5f}, fake {r['rmse_fake_fp32']:.5f} "
                  f"(ratio {r['ratio']:.3f} +- {r['ratio_se']:.3f}; one call {r['one_call_ratio']:.3f}); PSNR Q/DQ - fake, paired: {r['psnr_diff_qdq_minus_fake'][0]:+.2f} +- {r['psnr_diff_qdq_minus_fake'][1]:.2f} dB; PSNR to FP32: Q/DQ {r['psnr_qdq_fp32'][0]:.2f}, fake "
                  f"{r['psnr_fake_fp32'][0]:.2f} dB; RMSE Q/DQ vs fake {r['rmse_qdq_fake']:.5f} "
                  f"({'pass' if r['pass'] else 'FAIL'}){control_txt}; {r['identical_images']}/{args.images} images identical; quantized {len(graph)} in the graph, "
                  f"{len(torch_side)} in torch, {len(r['only_in_graph'])}/{len(r['only_in_torch'])} only on one side, "
                  f"{len(r['amax_mismatches'])} ranges differ; one call: "
                  f"rel Q/DQ vs fake {r['one_call_rel_qdq_fake']:.2e}, fake vs FP32 {r['one_call_rel_fake_fp32']:.2e}",
                  flush=True)
    dest = args.out or args.calib_dir / "qdq_crosscheck.json"
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
