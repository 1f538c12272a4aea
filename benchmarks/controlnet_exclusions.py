"""The measurement behind the ControlNet's default exclusions (trtkit/graph/patterns_controlnet.py).

For each tiny ControlNet (SD 1.5 and SDXL architecture, trtkit/tiny_controlnet.py) and INT8/FP8 level 3/4 Q/DQ
with FP32 elsewhere, it quantizes the ControlNet with the zero convs and/or the conditioning embedding
included or not, feeds the residuals to the FP32 residual-input UNet, and prints the relative error of
noise_pred against the all-FP32 chain (inputs of another seed than the pass's max-calibration run).

    python3 benchmarks/controlnet_exclusions.py --out /tmp/cn-excl    # about 5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx

VARIANTS = {"both excluded (default)": (),
            "zero convs quantized": ("controlnet_down_blocks", "controlnet_mid_block"),
            "cond embedding quantized": ("controlnet_cond_embedding",),
            "cond embedding blocks quantized": ("controlnet_cond_embedding.blocks",),
            "both quantized": ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")}


def main() -> None:
    from trtkit.exporter import ExportConfig, export, run_onnxruntime
    from trtkit.graph.qdq import QuantizeConfig, quantize
    from trtkit.graph.ranges import sample_feeds
    from trtkit.tiny_controlnet import make_tiny_controlnet_pipeline

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    for arch in ("sdxl", "sd15"):
        folder = args.out / arch / "model"
        if not folder.exists():
            make_tiny_controlnet_pipeline(folder, arch=arch)
        files = {c: export(ExportConfig(model_dir=folder, component=c, profile="tiny-256",
                                        out_dir=args.out / arch / "onnx")).path for c in ("controlnet", "unet")}
        m = onnx.load(str(files["controlnet"]), load_external_data=False)
        feeds = sample_feeds(m, "tiny-256", seed=7)
        names = [o.name for o in m.graph.output]

        def noise(cn: Path, names: list[str] = names, feeds: dict = feeds, unet: Path = files["unet"]) -> np.ndarray:
            res = dict(zip(names, run_onnxruntime(cn, feeds), strict=True))
            return run_onnxruntime(unet, {**feeds, **res})[0]

        ref = noise(files["controlnet"])
        for prec in ("int8", "fp8"):
            for i, (name, inc) in enumerate(VARIANTS.items()):
                r = quantize(QuantizeConfig(onnx_path=files["controlnet"], precision=prec, include=inc, fp16=False,
                                            output=args.out / arch / f"{prec}-{i}.onnx"))
                err = float(np.abs(noise(r.path) - ref).max() / np.abs(ref).max())
                print(f"{arch} {prec} {name:34s} conv {r.counts['conv']['quantized']}/{r.counts['conv']['total']}  "
                      f"noise_pred rel err {err:.4f}", flush=True)


if __name__ == "__main__":
    main()
