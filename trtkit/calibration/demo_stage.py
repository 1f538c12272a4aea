"""Demo stage: calibrate the tiny pipeline on a few built-in prompts and steps (CPU, a few seconds), in the
demo model's precision (INT8 for the UNet, FP8 for FLUX: trtkit/demo.py says why)."""

from __future__ import annotations

from pathlib import Path

DEMO_PROMPTS = 2
DEMO_STEPS = 4


def demo_stage(state) -> tuple[str, list[Path]]:  # type: ignore[no-untyped-def]
    from trtkit import calibfile
    from trtkit.calibration.calibrate import CalibrateConfig, Recipe, calibrate
    from trtkit.demo import Skipped
    from trtkit.profiles import get_profile

    if state.model_dir is None:
        raise Skipped("no model to calibrate (the model stage did not run)")
    height, width = get_profile(state.config.profile).resolution
    out = Path(state.config.workdir) / "calib.json"
    calibrate(CalibrateConfig(model_dir=Path(state.model_dir), out=out, num_prompts=DEMO_PROMPTS,
                              steps=DEMO_STEPS, batch=2, recipe=Recipe(precision=state.model.precision),
                              height=height, width=width, seed=state.config.seed, device="cpu"))
    state.calib = out
    cal = calibfile.load(out)
    files = [out] + ([out.with_suffix(".safetensors")] if cal.smooth else [])
    sq = f"SmoothQuant on {len(cal.smooth)} linear layers" if cal.smooth else "no SmoothQuant"
    return (f"{cal.precision.upper()} ranges for {len(cal.activations)} {state.model.label} inputs (level {cal.settings['level']:g}, "
            f"{cal.settings['reduction']} over {cal.settings['steps_used']} of {DEMO_STEPS} steps, {sq}) "
            f"from {DEMO_PROMPTS} prompts", files)

