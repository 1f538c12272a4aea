"""`trtkit run` / `trtkit bench` on a FLUX.1 or SD3.x diffusers folder: the folder's pipeline (bf16 on a GPU,
float32 on a CPU) made to run its denoising loop on the runtime by `trtkit.accelerate`, so run, bench and a
user's accelerated script give the same image for the same seed (a CPU torch.Generator seeded with --seed, as
the SD path draws its latents on the CPU).

The transformer runs in torch inside the loop graph, or with --engines as a TensorRT engine (`transformer.plan`
of the folder, or the plan given; runtime/dit_engine.py): then the torch transformer is loaded (diffusers' pipeline
reads its config) and stays on the CPU, except where diffusers takes the pipeline's device from its first module
(versions before its split-device rule: SD3's transformer), which then goes to the GPU too. The text encoders and
VAE run in torch on the GPU. --scheduler is
refused with one line (a DiT folder runs its FlowMatchEulerDiscreteScheduler).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trtkit.errors import TrtkitError

DIT_PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline")


def is_dit_folder(model_dir: Path | str) -> bool:
    """Whether `model_dir/model_index.json` names a FLUX / SD3 text-to-image pipeline."""
    index = Path(model_dir) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name") in DIT_PIPELINES
    except (OSError, ValueError):
        return False  # the SD path reports a missing or broken folder in its own words


def _vae_scale_factor(model_dir: Path) -> int:
    """diffusers' FluxPipeline / StableDiffusion3Pipeline `vae_scale_factor`, from vae/config.json."""
    try:
        n = len(json.loads((Path(model_dir) / "vae" / "config.json").read_text())["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return 8  # the pipelines' own value without a VAE; a broken folder is reported by the load
    return 2 ** (n - 1)


def check_call(model_dir: Path, cfg: Any) -> None:
    """One-line refusals of what a FLUX / SD3 folder's call does not take, before the (slow) pipeline load."""
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    kind = "flux" if index.get("_class_name") == "FluxPipeline" else "sd3"
    if cfg.scheduler is not None:
        raise TrtkitError(f"--scheduler {cfg.scheduler}: a FLUX / SD3 folder runs its own "
                          "FlowMatchEulerDiscreteScheduler (the runtime's switches are for SD / SDXL)")
    if cfg.negative_prompt and kind == "flux":
        # diffusers' FluxPipeline uses one only with true CFG (true_cfg_scale > 1), which run does not do
        raise TrtkitError("--negative-prompt: a FLUX.1 folder takes no negative prompt (guidance is embedded)")
    m = 2 * _vae_scale_factor(model_dir)  # latents packed 2x2 (FLUX) / patches of 2 (SD3)
    if any(v is not None and v % m for v in (cfg.height, cfg.width)):
        # diffusers' SD3 raises, its FLUX rounds down to a smaller image than asked for
        raise TrtkitError(f"{'FLUX.1' if kind == 'flux' else 'SD3'} height and width must be multiples of {m}, got "
                          f"{cfg.height or 'default'}x{cfg.width or 'default'}")


class DitPipeline:
    """A loaded, accelerated FLUX / SD3 pipeline, reusable across calls (the captured graph is kept)."""

    def __init__(self, model_dir: Path, engines: Path | None = None, device: str | None = None,
                 cuda_graph: bool = True, compile: bool = False, trust_engine: bool = False,
                 backend: str | None = None) -> None:
        import torch
        from diffusers import DiffusionPipeline

        from trtkit._quiet import quiet_loading
        from trtkit.runtime.accelerate import accelerate
        from trtkit.runtime.torch_stages import default_device

        self.device = device or default_device()
        self.model_dir = Path(model_dir)
        if engines is not None:  # one-line errors before the (slow) pipeline load
            from trtkit.runtime.dit_engine import plan_path
            from trtkit.runtime.engine import plan_backend

            plan = plan_path(engines)
            if compile:
                raise TrtkitError("--compile is for the torch transformer; a TensorRT engine is compiled already")
            if self.device != "cuda":
                raise TrtkitError("TensorRT engines need a CUDA GPU; none found")
            plan_backend(plan, backend)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        try:
            with quiet_loading():
                pipe = DiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=dtype)
        except Exception as e:
            raise TrtkitError(f"cannot load the pipeline in {model_dir}: {str(e).splitlines()[0]}") from e
        pipe.set_progress_bar_config(disable=True)
        if engines is None:
            pipe.to(self.device)
        else:  # the engine replaces the transformer in the loop: its weights stay on the CPU where they can
            for name, module in pipe.components.items():
                if name != "transformer" and isinstance(module, torch.nn.Module):
                    module.to(self.device)
            if pipe._execution_device.type != self.device:
                # diffusers before the split-device rule took it from the first module of __init__: SD3's transformer
                pipe.transformer.to(self.device)
        self.pipe = accelerate(pipe, engines=engines, cuda_graph=cuda_graph, compile=compile,
                               trust_engine=trust_engine, backend=backend)
        self.executor = self.pipe._trtkit.executor
        self.runner = self.pipe._trtkit.runner

    def __call__(self, cfg: Any) -> Any:
        import torch

        from trtkit.runtime.pipeline import RunResult

        check_call(self.model_dir, cfg)
        kw: dict[str, Any] = {"prompt": cfg.prompt, "num_inference_steps": cfg.steps, "height": cfg.height,
                              "width": cfg.width, "generator": torch.Generator("cpu").manual_seed(cfg.seed)}
        if cfg.guidance is not None:  # else the pipeline's own default (FLUX.1-dev 3.5, SD3 7.0)
            kw["guidance_scale"] = cfg.guidance
        if cfg.negative_prompt:
            kw["negative_prompt"] = cfg.negative_prompt
        image = self.pipe(**kw).images[0]
        if "_trtkit_timings_ms" not in self.pipe.__dict__:  # pragma: no cover - accelerate fell back
            raise TrtkitError("the runtime did not run this call (see the warning above)")
        timings = dict(self.pipe.__dict__.pop("_trtkit_timings_ms"))
        return RunResult(image=image, latents=self.runner.result(), executor=self.executor.name,
                         cuda_graph=self.runner.use_graph, timings_ms=timings)
