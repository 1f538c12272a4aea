"""LoRA on an 8-bit engine, in quality: a LoRA-refit INT8 (FP8) UNet against a freshly calibrated one, on the digits
denoiser, both measured against the LoRA-fused FP32 result.

  refit   the base model calibrated, then the LoRA fused into the float weights and every touched weight
          re-quantized per output channel with NEW weight scales, activation scales left as calibrated on the
          base: what `trtkit refit --lora --base unet.onnx` does to a Q/DQ engine (graph/lora.py
          requantized_weights). Here in torch fake quantization: fakequant.quantized() over the fused weights
          with the base calibration file.
  fresh   the LoRA-fused model calibrated afresh (the same recipe), then quantized.
  stale   the quantized base without the LoRA (what the refit has to beat).

The LoRA is trained here (PEFT, a few hundred CPU steps: the digits drawn bolder, (x01)^0.5, a style that keeps
the class) or random (`--lora random`). It is written with diffusers' save_lora_weights and read back through
trtkit's own reader (graph/lora.py read_adapter), and the script checks that trtkit's numpy path (read_adapter ->
fused weight -> scales.quantize_weight) gives the torch path's weights (PEFT merge -> fake_quant_weight).

    flock /tmp/trtkit-heavy.lock python3 benchmarks/digits/lora_refit.py --per-digit 26 --out /tmp/trtkit-lora-refit
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import add_sampling_args, classifier, ddim, eval_samples, record_stats  # noqa: E402
from model import NULL_CLASS, digits_images, load_model, make_scheduler  # noqa: E402
from quality_modes import restrict  # noqa: E402  (bench.py put benchmarks/ on sys.path)

from trtkit import calibfile  # noqa: E402
from trtkit.calibration import fakequant, levels  # noqa: E402
from trtkit.calibration.calibrate import Recipe, build_calibration  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2")
RECIPES = {"INT8": Recipe(), "FP8": Recipe(precision="fp8")}  # trtkit's defaults: INT8 level 3 mean, FP8 level 4 max


def train_lora(unet: Any, emb: Any, steps: int, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A PEFT LoRA fine-tuned to draw the digits bolder; returns its state in diffusers' key form."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = copy.deepcopy(unet).train()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(TARGETS)))
    x, y = digits_images()
    x = (((x + 1) / 2) ** 0.5) * 2 - 1  # bolder strokes
    y = torch.tensor(y)
    acp = make_scheduler().alphas_cumprod
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        c = y[idx].clone()
        c[torch.rand(64) < 0.1] = NULL_CLASS
        t = torch.randint(0, 1000, (64,))
        noise = torch.randn_like(x[idx])
        a = acp[t].view(-1, 1, 1, 1)
        with torch.no_grad():
            enc = emb(c)[:, None]
        pred = unet(a.sqrt() * x[idx] + (1 - a).sqrt() * noise, t, encoder_hidden_states=enc).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def fused_unet(unet: Any, lora_file: Path, scale: float) -> tuple[Any, dict[str, np.ndarray]]:
    """(the UNet with the LoRA fused through diffusers/PEFT, trtkit's numpy fused weight per touched module)."""
    from diffusers import StableDiffusionPipeline

    from trtkit.graph.lora import read_adapter

    fused = copy.deepcopy(unet)
    state, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(lora_file), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, fused, adapter_name="x", metadata=meta)
    fused.fuse_lora(lora_scale=scale)
    fused.unload_lora()  # the fused weights stay, the PEFT layers go
    modules = dict(unet.named_modules())
    mine = {}
    for name, layer in read_adapter(lora_file).layers.items():
        w = modules[name].weight.detach().numpy()
        mine[name] = w + np.float32(scale) * layer.delta().reshape(w.shape)
    return fused.eval(), mine


def check_paths_agree(fused: Any, mine: dict[str, np.ndarray]) -> dict[str, float]:
    """trtkit's numpy refit path vs the torch one: fused weights, and the re-quantized weights (dequantized)."""
    from trtkit.graph.scales import dequantize_weight, quantize_weight

    modules = dict(fused.named_modules())
    out = {"fused_max_rel": 0.0, "int8_max_rel": 0.0, "fp8_max_rel": 0.0}
    for name, w_np in mine.items():
        w_t = modules[name].weight.detach()
        amax = float(w_t.abs().max())
        out["fused_max_rel"] = max(out["fused_max_rel"], float(np.abs(w_t.numpy() - w_np).max()) / amax)
        for prec in ("int8", "fp8"):
            q, s = quantize_weight(w_np, 0, prec, fp16=False)
            deq = dequantize_weight(q, s, 0, prec)
            ref = fakequant.fake_quant_weight(w_t, prec).numpy()
            out[f"{prec}_max_rel"] = max(out[f"{prec}_max_rel"], float(np.abs(deq - ref).max()) / amax)
    return out


def calibration(unet: Any, emb: Any, recipe: Recipe, args: Any, stats: Any) -> Any:
    r = recipe.resolved()
    keys = set(levels.targets(unet, r.level))  # type: ignore[arg-type]
    keys = {k for k in stats.amax if k in keys or k.rpartition(".")[0] in keys}
    cal = build_calibration(restrict(stats, keys), unet, r, run={"benchmark": "digits lora_refit"})
    path = calibfile.save(cal, args.out / f"cal_{id(unet)}_{r.precision}.json")
    return calibfile.load(path)  # as a deployment would read it


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lora", choices=["train", "random"], default="train")
    ap.add_argument("--lora-steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--random-std", type=float, default=1.5, help="--lora random: delta size relative to the weights")
    ap.add_argument("--scale", type=float, default=0.8)
    add_sampling_args(ap, per_digit=26)
    ap.add_argument("--precisions", default="INT8,FP8")
    ap.add_argument("--out", type=Path, default=Path("/tmp/trtkit-lora-refit"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    from diffusers import StableDiffusionPipeline

    from trtkit.tiny_lora import random_lora_state, save_diffusers

    unet, emb = load_model()
    if args.lora == "train":
        state = train_lora(unet, emb, args.lora_steps, args.rank, args.seed)
    else:
        state = random_lora_state(unet, seed=args.seed, rank=args.rank, targets=TARGETS, std=args.random_std)
    lora_file = save_diffusers(state, args.out, "digits_lora.safetensors", StableDiffusionPipeline,
                               targets=TARGETS)
    print(f"LoRA ({args.lora}, rank {args.rank}, {len(state) // 2} layers): {lora_file}, {time.time() - t0:.0f} s")
    fused, mine = fused_unet(unet, lora_file, args.scale)
    agree = check_paths_agree(fused, mine)
    print("trtkit numpy path vs torch (max |diff| / max |W|): "
          + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()))

    clf, _, _ = classifier()
    labels, noise = eval_samples(args.per_digit, args.seed)

    def sample(model: Any, ctx: Any = None) -> torch.Tensor:
        with ctx or contextlib.nullcontext():
            return ddim(model, emb, labels, noise, args.steps, args.guidance).clamp(-1, 1)

    ref = sample(fused)
    n = len(labels)

    def score(x: torch.Tensor) -> dict[str, float]:
        rmse = ((x - ref) ** 2).mean(dim=(1, 2, 3)).sqrt()
        psnr = 20 * torch.log10(2.0 / rmse.clamp_min(1e-8))  # images in [-1, 1]
        acc = float((clf.predict(x.reshape(n, -1).numpy()) == labels.numpy()).mean())
        return {"rmse": float(rmse.mean()), "rmse_se": float(rmse.std() / math.sqrt(n)),
                "psnr_db": float(psnr.mean()), "psnr_se": float(psnr.std() / math.sqrt(n)),
                "accuracy": acc, "accuracy_se": math.sqrt(acc * (1 - acc) / n)}

    rows: dict[str, dict[str, float]] = {"fused FP32 (reference)": score(ref), "base FP32, no LoRA": score(sample(unet))}
    stats_base = record_stats(unet, emb, args)
    stats_fused = record_stats(fused, emb, args)
    for prec in [p.strip() for p in args.precisions.split(",")]:
        recipe = RECIPES[prec]
        cal_base = calibration(unet, emb, recipe, args, stats_base)
        cal_fused = calibration(fused, emb, recipe, args, stats_fused)
        rows[f"{prec} refit (base calibration, new weight scales)"] = score(sample(fused, fakequant.quantized(fused, cal_base)))
        rows[f"{prec} freshly calibrated on the fused model"] = score(sample(fused, fakequant.quantized(fused, cal_fused)))
        rows[f"{prec} base, no LoRA (stale)"] = score(sample(unet, fakequant.quantized(unet, cal_base)))
    print(f"\n{n} samples, {args.steps} DDIM steps, guidance {args.guidance}, LoRA scale {args.scale}; "
          "against the fused-FP32 samples\n")
    print("| | latent RMSE | PSNR (dB) | classifier accuracy |\n|---|---|---|---|")
    for k, r in rows.items():
        if k.startswith("fused FP32"):
            continue
        print(f"| {k} | {r['rmse']:.4f} ± {r['rmse_se']:.4f} | {r['psnr_db']:.1f} ± {r['psnr_se']:.1f} | "
              f"{r['accuracy'] * 100:.1f}% ± {r['accuracy_se'] * 100:.1f} |")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "paths_agree": agree, "rows": rows,
              "seconds": time.time() - t0, "torch": torch.__version__}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"\n{time.time() - t0:.0f} s; {args.out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
