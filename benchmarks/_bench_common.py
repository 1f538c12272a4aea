"""What the pipeline benchmarks share (bench_loop.py, bench_controlnet.py, bench_lora.py): the scheduler, a
random-weight UNet and prompt embeddings from a real config, the row timer, and the diffusers baseline, the
environment and the printed/written summary at the end. And what the quality benchmarks share (digits/,
shapes/): the options of their calibration recording."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCHEDULER = {  # both models' training betas; Euler with SDXL's scheduler config
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}

BASELINE_RULE = "the lower of the two diffusers medians (first and last row)"


def add_run_args(ap: argparse.ArgumentParser, repeats: int) -> None:
    """The options every pipeline benchmark takes: the loop (steps, guidance), the timing and where it runs."""
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, default=None)


def add_calibration_args(ap: argparse.ArgumentParser, steps: int, guidance: float, prompts: str = "prompts") -> None:
    """The options a quality benchmark's calibration recording reads (its guided sampling loop: steps, guidance;
    `--calib-<prompts>` prompts in batches of `--calib-batch`; the seed), with that benchmark's loop defaults."""
    ap.add_argument("--steps", type=int, default=steps, help="sampling steps")
    ap.add_argument("--guidance", type=float, default=guidance, help="guidance scale")
    ap.add_argument(f"--calib-{prompts}", type=int, default=32, help="as `trtkit calibrate --num-prompts`")
    ap.add_argument("--calib-batch", type=int, default=2, help="as `trtkit calibrate --batch`")
    ap.add_argument("--seed", type=int, default=0)


def device_and_dtype(device: str | None) -> tuple[str, Any]:
    """The GPU where there is one (fp16), else the CPU (fp32)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.float16 if device == "cuda" else torch.float32


def random_unet(cfg: dict[str, Any], device: str, seed: int) -> Any:
    """The UNet of `cfg` with seeded random weights, fp32, built on `device` (random init on the GPU: seconds,
    not minutes, for 2.6 B parameters). Not yet cast or frozen: a ControlNet is made from it first."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**cfg)


def frozen(module: Any, dtype: Any) -> Any:
    return module.to(dtype).eval().requires_grad_(False)


def prompt_embeds(cfg: dict[str, Any], device: str, dtype: Any, seed: int) -> dict[str, Any]:
    """Random prompt embeddings (and SDXL's pooled ones) of the UNet's sizes, as the pipelines take them."""
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    d = cfg["cross_attention_dim"]

    def rnd(*shape: int) -> Any:
        return torch.randn(shape, generator=g).to(device, dtype)

    emb = {"prompt_embeds": rnd(1, 77, d), "negative_prompt_embeds": rnd(1, 77, d)}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        emb.update(pooled_prompt_embeds=rnd(1, pooled), negative_pooled_prompt_embeds=rnd(1, pooled))
    return emb


class Bench:
    def __init__(self, device: str, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.rows: list[dict[str, Any]] = []

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def time(self, name: str, fn: Callable[[], Any], extra_bytes: int = 0, **info: Any) -> dict[str, Any]:
        import torch

        t0 = time.perf_counter()
        for _ in range(self.warmup):
            fn()
        self.sync()
        first = time.perf_counter() - t0
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = []
        for _ in range(self.repeats):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            ms.append((time.perf_counter() - t) * 1e3)
        peak = (torch.cuda.max_memory_allocated() if self.device == "cuda" else 0) + extra_bytes
        row = {"name": name, "median_ms": statistics.median(ms), "min_ms": min(ms), "all_ms": ms,
               "warmup_s": first, "peak_gib": peak / 2**30, **info}
        self.rows.append(row)
        print(f"  {name:28s} {row['median_ms']:9.1f} ms  (min {row['min_ms']:.1f}, warm-up {first:.1f} s, "
              f"peak {row['peak_gib']:.2f} GiB)", flush=True)
        return row

    def baseline(self, first: dict[str, Any], diffusers: Callable[[], Any]) -> float:
        """Times diffusers again, last (the host-bound row drifts with the host's load), takes the lower of the
        two medians as the baseline (BASELINE_RULE) and gives every row its speedup over it."""
        last = self.time("diffusers (again, last)", diffusers)
        base = min(first["median_ms"], last["median_ms"])
        for r in self.rows:
            r["speedup_vs_diffusers"] = base / r["median_ms"]
        return float(base)


def environment(device: str) -> dict[str, Any]:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name() if device == "cuda" else platform.processor()}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
        from cuda import bindings

        env["cuda-bindings"] = bindings.__version__
    except Exception:  # pragma: no cover
        pass
    return env


def report(summary: dict[str, Any], out: Path | None) -> None:
    """The rows as a markdown table and the rest as JSON on stdout; the whole summary to `out`."""
    print("\n| row | median ms | speedup vs diffusers | peak GiB |\n|---|---|---|---|")
    for r in summary["rows"]:
        print(f"| {r['name']} | {r['median_ms']:.1f} | {r['speedup_vs_diffusers']:.2f}x | {r['peak_gib']:.2f} |")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=1))
    if out:
        out.write_text(json.dumps(summary, indent=1))
