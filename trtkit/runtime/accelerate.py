"""`trtkit.accelerate(pipe, engines=DIR)`: an existing diffusers SD / SDXL pipeline runs its denoising
loop on the trtkit runtime (one CUDA graph on a GPU; the TensorRT UNet when `engines` has unet.plan),
with no other change to the user's script: `pipe(prompt, ...)` keeps its signature and return type.

The pipeline object's class is swapped for a subclass whose `__call__` encodes the prompt, prepares
latents and decodes exactly as diffusers does (its own `encode_prompt`, `prepare_latents`, generator
use and ancestral noise draws), so the same seed gives the same image. Arguments the runtime does not
handle (callbacks, IP-adapters, custom timesteps, ...) fall back to diffusers' own `__call__`, and so
does a call whose scheduler the device tables cannot reproduce exactly (schedulers.unsupported_reason):
a warning, never a different image. The tables are built from `pipe.scheduler` itself at every call.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtkit.errors import TrtkitError
from trtkit.runtime.controlnet import CONTROL_ARGS

log = logging.getLogger(__name__)

# Call arguments the accelerated path understands; anything else (non-default) goes to diffusers.
HANDLED = {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "height", "width", "generator",
           "latents", "output_type", "return_dict", "num_images_per_prompt", "prompt_embeds",
           "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"}


@dataclass
class _Runtime:
    runner: Any
    executor: Any
    original_call: Any
    defaults: dict[str, Any]
    signature: inspect.Signature
    options: dict[str, Any]  # accelerate()'s arguments, to rebuild the executor for a replaced pipe.unet
    unet_key: tuple  # _unet_key(pipe) when the executor was built
    control: bool = False  # a ControlNet pipeline: runtime/controlnet.py's executor and call arguments


def _unet_key(pipe: Any) -> tuple:
    """What the executor baked in: the UNet object (the torch executor holds it), its dtype (the loop's I/O dtype)
    and device (CPU loop or CUDA graph)."""
    cn = getattr(pipe, "controlnet", None)  # a ControlNet pipeline's nets are held by its executor too
    return id(pipe.unet), pipe.unet.dtype, pipe.unet.device.type, id(cn), cn is not None and cn.dtype


class _Fallback(Exception):
    """Raised by _accelerated before it draws from the generator: diffusers' own loop then gives the image."""


def accelerate(pipe: Any, engines: Path | str | None = None, cuda_graph: bool = True, trust_engine: bool = False,
               compile: bool = False, kernels: str = "tuned", backend: str | None = None) -> Any:
    """Make `pipe` (StableDiffusionPipeline / StableDiffusionXLPipeline, or their ControlNet pipelines with one
    ControlNet or a MultiControlNetModel: runtime/controlnet.py; FluxPipeline / StableDiffusion3Pipeline through
    accelerate_dit.py) use the runtime; returns `pipe`.

    With the torch UNet on a GPU, `kernels="tuned"` changes `pipe.unet` in place: channels-last weights, q/k/v
    fused (diffusers' fuse_qkv_projections; `pipe.unet.unfuse_qkv_projections()` undoes it), and GroupNorm,
    Transformer2D and GEGLU modules swapped for subclasses that keep activations channels-last and fuse GEGLU
    (runtime/nhwc.py, runtime/geglu.py). The module computes the same function and still runs anywhere, also
    outside trtkit. `kernels="plain"` leaves it as it is.

    `backend` ("trt" / "rtx") names the TensorRT that runs `engines`; by default the one that built the plan
    (its header), so a TensorRT-RTX plan runs on TensorRT-RTX even where full TensorRT is installed too."""
    from trtkit.runtime.graph_runner import LoopRunner
    from trtkit.runtime.pipeline import make_executor
    from trtkit.runtime.schedulers import unsupported_reason

    if hasattr(pipe, "transformer") and not hasattr(pipe, "unet"):  # FLUX / SD3: their I/O and tables
        from trtkit.runtime.accelerate_dit import accelerate_dit

        return accelerate_dit(pipe, engines=engines, cuda_graph=cuda_graph, compile=compile,
                              trust_engine=trust_engine, backend=backend)
    if not hasattr(pipe, "unet") or not hasattr(pipe, "encode_prompt"):
        raise TrtkitError(f"{type(pipe).__name__} is not a Stable Diffusion / SDXL text-to-image pipeline")
    base = type(pipe).__mro__[1] if getattr(pipe, "_trtkit", None) is not None else type(pipe)
    if not _reproduced(base):
        # img2img, inpaint, ControlNet img2img / union, PAG (pag_scale=3 by default), SAG ...: another __call__
        raise TrtkitError(f"{base.__name__} runs its own __call__; accelerate reproduces only diffusers' "
                          "StableDiffusionPipeline and StableDiffusionXLPipeline text-to-image calls and their "
                          "ControlNet pipelines")
    reason = unsupported_reason(pipe.scheduler)
    if reason is not None:  # a one-line error now rather than a slow fallback at every call
        raise TrtkitError(reason, hint="use euler, euler_a, ddim or dpmpp_2m with a supported config (docs/runtime.md)")
    if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
        # an LCM-distilled UNet: diffusers feeds it a guidance-scale embedding and no CFG batch; the loop does not
        raise TrtkitError(f"{type(pipe).__name__}'s UNet takes a guidance embedding (time_cond_proj_dim="
                          f"{pipe.unet.config.time_cond_proj_dim}, LCM); the runtime has no such input")
    device = pipe.unet.device.type
    if backend not in (None, "trt", "rtx"):
        raise TrtkitError(f"backend must be 'trt' or 'rtx', got {backend!r}")
    control = getattr(pipe, "controlnet", None) is not None
    if control:  # ControlNets + UNet in torch (runtime/controlnet.py); no TensorRT ControlNet executor yet
        if engines is not None:
            raise TrtkitError(f"{base.__name__}: accelerate runs ControlNet pipelines with the torch UNet only; "
                              "leave engines unset")
        from trtkit.runtime.controlnet import ControlNetExecutor, controlnets
        from trtkit.runtime.kernel_choices import kernel_options

        executor: Any = ControlNetExecutor(pipe.unet, controlnets(pipe.controlnet), compile=compile,
                                           **kernel_options(kernels, device, compile))
    else:
        executor = make_executor(pipe, Path(engines) if engines else None, trust_engine, compile, device, kernels,
                                 backend)
    runner = LoopRunner(executor, device=device, use_graph=cuda_graph)
    sig = inspect.signature(base.__call__)
    defaults = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    rt = _Runtime(runner, executor, base.__call__, defaults, sig, dict(
        engines=engines, cuda_graph=cuda_graph, trust_engine=trust_engine, compile=compile, kernels=kernels,
        backend=backend),
        _unet_key(pipe), control)
    if getattr(pipe, "_trtkit", None) is None:
        pipe.__class__ = type(f"Accelerated{base.__name__}", (base,), {"__call__": _call})
    object.__setattr__(pipe, "_trtkit", rt)
    return pipe


def _reproduced(cls: type) -> bool:
    """Whether `cls.__call__` is the text-to-image call _accelerated reproduces (the class or a subclass that
    keeps it; AutoPipelineForText2Image gives these classes), ControlNet's included."""
    from diffusers import (
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
    )

    return cls.__call__ in (StableDiffusionPipeline.__call__, StableDiffusionXLPipeline.__call__,
                            StableDiffusionControlNetPipeline.__call__, StableDiffusionXLControlNetPipeline.__call__)


def _call(self: Any, *args: Any, **kwargs: Any) -> Any:
    from trtkit.runtime.schedulers import unsupported_reason

    rt: _Runtime = self._trtkit
    if _unet_key(self) != rt.unet_key:  # `pipe.unet = other` or `pipe.to(torch.float16)` after accelerate(): the
        # executor held the old UNet (an image 0.46 away from diffusers') or dtype (a dtype-mismatch traceback)
        log.info("trtkit.accelerate: pipe.unet was replaced or moved; rebuilding the runtime's UNet executor")
        accelerate(self, **rt.options)
        rt = self._trtkit
    rt.executor.refresh()  # before either loop: e.g. fused q/k/v undone where a LoRA loaded since wraps q/k/v
    if args:  # positional arguments, as diffusers' signature names them (pipe(prompt, height, width, steps))
        try:
            bound = rt.signature.bind_partial(self, *args, **kwargs).arguments
        except TypeError:  # diffusers' own call gives its own error
            return rt.original_call(self, *args, **kwargs)
        kwargs = {k: v for k, v in bound.items() if k != "self" and k != "kwargs"} | bound.get("kwargs", {})
    cak = kwargs.get("cross_attention_kwargs")
    lora_scale = None
    if isinstance(cak, dict) and set(cak) == {"scale"}:  # diffusers' LoRA scale: applied around the loop below
        lora_scale = float(cak["scale"])
        kwargs = {k: v for k, v in kwargs.items() if k != "cross_attention_kwargs"}
    handled = HANDLED | set(CONTROL_ARGS) if rt.control else HANDLED
    extra = {k: v for k, v in kwargs.items() if k not in handled and v is not None
             and not (k in rt.defaults and _same(v, rt.defaults[k]))}
    if not extra and hasattr(rt.executor, "engine") and _lora_active(self.unet):
        extra = {"a LoRA loaded into pipe.unet (a TensorRT UNet has its own weights: `trtkit refit`)": 1}
    if extra and lora_scale is not None:
        kwargs["cross_attention_kwargs"] = cak
    if extra:
        log.warning("trtkit.accelerate: %s not handled by the runtime; running diffusers' own loop",
                    ", ".join(sorted(extra)))
        return rt.original_call(self, **kwargs)
    reason = unsupported_reason(self.scheduler)  # the scheduler may have been swapped after accelerate()
    if reason is not None:
        log.warning("trtkit.accelerate: %s; running diffusers' own loop", reason)
        return rt.original_call(self, **kwargs)
    try:
        return _accelerated(self, rt, lora_scale=lora_scale, **kwargs)
    except _Fallback as e:
        if lora_scale is not None:
            kwargs["cross_attention_kwargs"] = cak
        log.warning("trtkit.accelerate: %s; running diffusers' own loop", e)
        return rt.original_call(self, **kwargs)


def _lora_active(unet: Any) -> bool:
    from trtkit.runtime.lora import is_tuner_layer, layer_state

    return any(is_tuner_layer(m) and layer_state(m) != ("disabled",) for m in unet.modules())


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def _accelerated(pipe: Any, rt: _Runtime, prompt: Any = None, negative_prompt: Any = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, generator: Any = None, latents: Any = None,
                 output_type: str = "pil", return_dict: bool = True, num_images_per_prompt: int = 1,
                 prompt_embeds: Any = None, negative_prompt_embeds: Any = None, pooled_prompt_embeds: Any = None,
                 negative_pooled_prompt_embeds: Any = None, lora_scale: float | None = None, **control: Any) -> Any:
    """`lora_scale`: diffusers' `cross_attention_kwargs={"scale": s}`, the strength of unfused PEFT adapters: the
    text encoders get it through diffusers' encode_prompt, the UNet's PEFT layers are scaled around the loop as
    diffusers' UNet scales them around each step (a new scale is a new graph key: runtime/lora.py)."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    from trtkit.runtime.executors import LoopShape
    from trtkit.runtime.pipeline import decode, is_sdxl
    from trtkit.runtime.schedulers import make_tables

    steps = num_inference_steps or rt.defaults.get("num_inference_steps", 50)
    g = rt.defaults.get("guidance_scale", 7.5) if guidance_scale is None else guidance_scale
    f = pipe.vae_scale_factor
    cn = None
    if rt.control:  # the size comes from the control image unless given (diffusers' prepare_image)
        from trtkit.runtime.controlnet import ControlCall

        cn = ControlCall(pipe, **{**{k: rt.defaults.get(k) for k in CONTROL_ARGS}, **control})
    else:
        height = height or pipe.unet.config.sample_size * f
        width = width or pipe.unet.config.sample_size * f
    cfg = g > 1.0
    device = pipe._execution_device
    sdxl = is_sdxl(pipe)
    _check_inputs(pipe, prompt=prompt, height=height, width=width, negative_prompt=negative_prompt,
                  prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                  pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                  **(cn.check_kwargs() if cn else {}))
    with torch.no_grad():
        if sdxl:
            pe, npe, pooled, npooled = pipe.encode_prompt(
                prompt=prompt, device=device, num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=cfg, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, lora_scale=lora_scale)
        else:
            pe, npe = pipe.encode_prompt(prompt, device, num_images_per_prompt, cfg, negative_prompt,
                                         prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                         lora_scale=lora_scale)
        b = pe.shape[0]
        if cn is not None:
            height, width = cn.prepare(height, width, b, num_images_per_prompt, device, cfg)
        cond = {"encoder_hidden_states": torch.cat([npe, pe]) if cfg else pe}
        if sdxl:
            tid = torch.tensor([[height, width, 0, 0, height, width]] * b, dtype=pe.dtype, device=device)
            cond["text_embeds"] = torch.cat([npooled, pooled]) if cfg else pooled
            cond["time_ids"] = torch.cat([tid, tid]) if cfg else tid
        shape = LoopShape(batch=b, latent_channels=pipe.unet.config.in_channels, latent_height=height // f,
                          latent_width=width // f, cfg=cfg, text_len=pe.shape[1], text_dim=pe.shape[2],
                          pooled_dim=cond["text_embeds"].shape[-1] if sdxl else None,
                          time_ids_dim=6 if sdxl else None)
        try:  # a shape the executor refuses (e.g. outside a TensorRT plan's profile) is diffusers' to run, not an error
            rt.executor.check_shape(shape)
        except TrtkitError as e:
            raise _Fallback(str(e)) from None
        tables = make_tables(pipe.scheduler, steps)  # the instance diffusers would step, not its config
        pipe.scheduler.set_timesteps(steps, device=device)  # as diffusers does before prepare_latents
        lat = pipe.prepare_latents(b, pipe.unet.config.in_channels, height, width, pe.dtype, device, generator,
                                   latents)
        noise = None
        if tables.uses_noise:  # the draws scheduler.step() would make, in the same order, from the same generator
            noise = torch.stack([randn_tensor(lat.shape, generator=generator, device=lat.device, dtype=lat.dtype)
                                 for _ in range(steps)]).float().cpu().numpy()
    if cn is not None:
        cond.update(cn.inputs(rt.executor, steps, cfg))
    saved = []
    if lora_scale is not None and lora_scale != 1.0 and _lora_active(pipe.unet):
        from diffusers.utils import scale_lora_layers

        from trtkit.runtime.lora import is_tuner_layer

        # restored as they were, not divided back (diffusers' unscale_lora_layers): with scale 0 that resets the
        # set_adapters weights, and x*s/s need not give x again (a spurious new graph key at the next call)
        saved = [(m, dict(m.scaling)) for m in pipe.unet.modules() if is_tuner_layer(m)]
        scale_lora_layers(pipe.unet, lora_scale)
    try:
        out = rt.runner(shape, tables, x_init=lat.float().cpu().numpy(), guidance=g, noise=noise, **cond)
    finally:
        for m, scaling in saved:
            m.scaling.update(scaling)
    if hasattr(rt.executor, "engine"):  # TensorRT-RTX: keep the kernels this first run compiled (x.runtime_cache)
        rt.executor.engine.save_runtime_cache()
    nsfw = None
    if output_type == "latent":
        images: Any = torch.from_numpy(out).to(device, pe.dtype)
    else:  # the safety checker / watermark between the VAE and postprocess, as diffusers
        images, nsfw = decode(pipe, out, output_type=output_type, dtype=pe.dtype)
    pipe.maybe_free_model_hooks()
    if not return_dict:
        return (images,) if sdxl else (images, nsfw)
    if sdxl:
        from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

        return StableDiffusionXLPipelineOutput(images=images)
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw)


def _check_inputs(pipe: Any, **given: Any) -> None:
    """diffusers' own argument checks (sizes not multiples of 8, prompt and prompt_embeds both given, ...), with
    its own ValueError, before any work. Its signature differs between SD and SDXL: pass what it names."""
    names = inspect.signature(pipe.check_inputs).parameters
    pipe.check_inputs(**{k: given.get(k) for k in names if k in given or k in ("prompt_2", "callback_steps")})
