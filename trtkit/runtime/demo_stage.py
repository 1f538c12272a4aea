"""Demo stage `run`: the tiny pipeline end to end through trtkit's runtime, writing image.png.

CPU: the eager loop with the torch UNet (the numpy reference of the fused step). GPU: the loop as one
CUDA graph, over the demo's TensorRT engine when the build stage made one that this machine can run,
else over the torch UNet. The FLUX demo goes the same way, `trtkit run` on its folder (pipeline_dit: the
accelerated FluxPipeline), with the torch transformer: the runtime does not take DiT engines yet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trtkit.demo import Skipped


def _engine_usable(engine: Path | None) -> bool:
    if engine is None or not Path(engine).is_file():
        return False
    try:
        from trtkit.backend import load_backend

        return load_backend().can_run  # e.g. False for a TensorRT-RTX plan on a Hopper GPU
    except Exception:
        return False


def demo_stage(state: Any) -> tuple[str, list[Path]]:
    if state.model_dir is None:
        raise Skipped("no model (the model stage did not run)")
    from trtkit.profiles import get_profile
    from trtkit.runtime.pipeline import RunConfig, default_device, run

    device = default_device()
    h, w = get_profile(state.config.profile).resolution
    m = state.model
    dit_engine = m.component == "transformer"  # pipeline_dit refuses engines (not wired into the runtime)
    engines = Path(state.engine) if device == "cuda" and not dit_engine and _engine_usable(state.engine) else None
    out = Path(state.config.workdir) / "image.png"
    cfg = RunConfig(model_dir=Path(state.model_dir), prompt=state.config.prompt, steps=state.config.steps,
                    guidance=m.guidance, seed=state.config.seed, height=h, width=w, device=device,
                    cuda_graph=device == "cuda", engines=engines)
    res = run(cfg, out)
    state.image = out
    how = "one CUDA graph" if res.cuda_graph else "eager loop"
    t = res.timings_ms
    unused = "; the plan is not used: the runtime does not take DiT engines yet" if dit_engine and state.engine and device == "cuda" else ""
    return (f"{h}x{w}, {cfg.steps} steps, {res.executor} {m.label}, {how} on {device}: denoise {t['denoise']:.0f} ms, "
            f"total {t['total']:.0f} ms{unused}", [out])
