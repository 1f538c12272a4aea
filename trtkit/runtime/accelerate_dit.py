"""`trtkit.accelerate(pipe)` for FluxPipeline and StableDiffusion3Pipeline: the denoising loop on the runtime
(one CUDA graph on a GPU over the torch transformer or a TensorRT transformer engine, dit_engine.py; the
numpy-reference loop on a CPU), the rest diffusers'.

As for SD/SDXL (accelerate.py), the pipeline's class is swapped for a subclass whose `__call__` does what
diffusers' does around the loop with diffusers' own methods: `check_inputs`, `encode_prompt` (CLIP + T5 in
torch), `prepare_latents` (same generator draws, FLUX's 2x2 packing and RoPE ids), the scheduler's sigmas from a
copy of `pipe.scheduler` set up with the pipeline's own arguments (flow_tables.py), and after the loop the
VAE decode (FLUX unpacked, then latents / scaling_factor + shift_factor) and postprocess. Arguments the loop
does not reproduce (callbacks, IP-adapters, FLUX's true CFG, SD3's skip-layer guidance, attention kwargs...)
run diffusers' own `__call__` with a one-line warning, and so does a scheduler the tables refuse: never a
different image.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

from trtkit.errors import TrtkitError
from trtkit.runtime.accelerate import _Fallback, _Runtime, _same

log = logging.getLogger(__name__)

# Call arguments the accelerated loop reproduces; any other non-default one goes to diffusers' own __call__.
HANDLED = {"prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3", "height",
           "width", "num_inference_steps", "sigmas", "guidance_scale", "num_images_per_prompt", "generator",
           "latents", "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
           "negative_pooled_prompt_embeds", "output_type", "return_dict", "max_sequence_length", "clip_skip", "mu"}


def pipeline_kind(cls: type) -> str | None:
    """"flux" / "sd3" when `cls.__call__` is diffusers' FluxPipeline / StableDiffusion3Pipeline text-to-image call."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return {FluxPipeline.__call__: "flux", StableDiffusion3Pipeline.__call__: "sd3"}.get(cls.__call__)


def _key(pipe: Any) -> tuple:
    return id(pipe.transformer), pipe.transformer.dtype, pipe.transformer.device.type


def accelerate_dit(pipe: Any, engines: Any = None, cuda_graph: bool = True, compile: bool | str = False,
                   trust_engine: bool = False, backend: str | None = None, **ignored: Any) -> Any:
    """accelerate() for a FLUX / SD3 pipeline (see trtkit.runtime.accelerate.accelerate). `compile=True` (or
    "blocks") compiles the transformer's repeated blocks in place, "whole" the whole transformer
    (dit_executor.compile_blocks); FLUX's q/k/v are fused first. `engines`: a transformer plan, or a
    folder holding transformer.plan, run by dit_engine.DitEngineExecutor in the loop instead of the torch module
    (which stays where it is: its config is read, and diffusers' own loop uses it when the runtime falls back)."""
    from trtkit.runtime.dit_executor import DitTorchExecutor
    from trtkit.runtime.flow_tables import flow_unsupported_reason
    from trtkit.runtime.graph_runner import LoopRunner

    base = type(pipe).__mro__[1] if getattr(pipe, "_trtkit", None) is not None else type(pipe)
    kind = pipeline_kind(base)
    if kind is None:
        raise TrtkitError(f"{base.__name__} runs its own __call__; accelerate reproduces only diffusers' "
                          "FluxPipeline and StableDiffusion3Pipeline text-to-image calls among DiT pipelines")
    if backend not in (None, "trt", "rtx"):
        raise TrtkitError(f"backend must be 'trt' or 'rtx', got {backend!r}")
    if engines is not None:
        from trtkit.runtime.dit_engine import plan_path

        plan_path(engines)  # a missing plan is named first
    reason = flow_unsupported_reason(pipe.scheduler)
    if reason is not None:
        raise TrtkitError(reason)
    executor: Any
    if engines is not None:
        from trtkit.runtime.dit_engine import load_executor

        if compile:
            raise TrtkitError("compile is for the torch transformer; a TensorRT engine is compiled already")
        device = pipe._execution_device.type  # the text encoders' device: the loop's buffers live there
        if device != "cuda":
            raise TrtkitError("TensorRT engines need a CUDA GPU; move the pipeline to cuda (the transformer may "
                              "stay on the CPU)")
        executor = load_executor(engines, kind, bool(getattr(pipe.transformer.config, "guidance_embeds", False)),
                                 trust_engine, backend)
    else:
        device = pipe.transformer.device.type
        executor = DitTorchExecutor(pipe.transformer, family=kind, compile=compile)
    runner = LoopRunner(executor, device=device, use_graph=cuda_graph)
    sig = inspect.signature(base.__call__)
    defaults = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    rt = _Runtime(runner, executor, base.__call__, defaults, sig,
                  dict(engines=engines, cuda_graph=cuda_graph, compile=compile, trust_engine=trust_engine,
                       backend=backend),
                  _key(pipe))
    if getattr(pipe, "_trtkit", None) is None:
        pipe.__class__ = type(f"Accelerated{base.__name__}", (base,), {"__call__": _call})
    object.__setattr__(pipe, "_trtkit", rt)
    object.__setattr__(pipe, "_trtkit_kind", kind)
    return pipe


def _call(self: Any, *args: Any, **kwargs: Any) -> Any:
    from trtkit.runtime.flow_tables import flow_unsupported_reason

    rt: _Runtime = self._trtkit
    if _key(self) != rt.unet_key:  # pipe.transformer replaced or moved: the executor holds the old one
        log.info("trtkit.accelerate: pipe.transformer was replaced or moved; rebuilding the runtime's executor")
        accelerate_dit(self, **rt.options)
        rt = self._trtkit
    if args:  # positional arguments, as diffusers' signature names them
        try:
            bound = rt.signature.bind_partial(self, *args, **kwargs).arguments
        except TypeError:
            return rt.original_call(self, *args, **kwargs)
        kwargs = {k: v for k, v in bound.items() if k != "self"}
    if any(k not in rt.signature.parameters for k in kwargs):  # diffusers' own TypeError
        return rt.original_call(self, **kwargs)
    extra = {k: v for k, v in kwargs.items() if k not in HANDLED and v is not None
             and not (k in rt.defaults and _same(v, rt.defaults[k]))}
    if extra:
        log.warning("trtkit.accelerate: %s not handled by the runtime; running diffusers' own loop",
                    ", ".join(sorted(extra)))
        return rt.original_call(self, **kwargs)
    reason = flow_unsupported_reason(self.scheduler)
    if reason is not None:
        log.warning("trtkit.accelerate: %s; running diffusers' own loop", reason)
        return rt.original_call(self, **kwargs)
    try:
        return _accelerated(self, rt, **kwargs)
    except _Fallback as e:
        log.warning("trtkit.accelerate: %s; running diffusers' own loop", e)
        return rt.original_call(self, **kwargs)


def _sync(device: Any) -> float:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _accelerated(pipe: Any, rt: _Runtime, **kw: Any) -> Any:
    import torch

    from trtkit.runtime.dit_executor import DitLoopShape
    from trtkit.runtime.flow_tables import make_flow_tables, pipeline_timestep_args

    kind = pipe._trtkit_kind
    a: dict[str, Any] = {k: kw.get(k, rt.defaults.get(k)) for k in HANDLED}
    device = pipe._execution_device
    t0 = _sync(device)
    f = pipe.vae_scale_factor
    height = a["height"] or pipe.default_sample_size * f
    width = a["width"] or pipe.default_sample_size * f
    g = a["guidance_scale"]
    names = inspect.signature(pipe.check_inputs).parameters
    given = {k: a.get(k) for k in names if k in a} | {"height": height, "width": width}
    pipe.check_inputs(**{k: v for k, v in given.items() if k in names})
    pipe._guidance_scale, pipe._joint_attention_kwargs, pipe._interrupt = g, None, False
    pipe._current_timestep = None
    nipp = 1 if a["num_images_per_prompt"] is None else a["num_images_per_prompt"]  # 0 is diffusers' error
    tcfg = pipe.transformer.config
    with torch.no_grad():
        if kind == "flux":
            pe, pooled, text_ids = pipe.encode_prompt(
                prompt=a["prompt"], prompt_2=a["prompt_2"], prompt_embeds=a["prompt_embeds"],
                pooled_prompt_embeds=a["pooled_prompt_embeds"], device=device, num_images_per_prompt=nipp,
                max_sequence_length=a["max_sequence_length"], lora_scale=None)
            lat, img_ids = pipe.prepare_latents(pe.shape[0], tcfg.in_channels // 4, height, width, pe.dtype, device,
                                                a["generator"], a["latents"])
            targs = pipeline_timestep_args("flux", pipe.scheduler, a["num_inference_steps"], lat.shape[1],
                                           sigmas=a["sigmas"])
            lh, lw = 2 * (int(height) // (f * 2)) // 2, 2 * (int(width) // (f * 2)) // 2
            shape = DitLoopShape(batch=lat.shape[0], latent_channels=tcfg.in_channels, latent_height=lh,
                                 latent_width=lw, cfg=False, text_len=pe.shape[1], text_dim=pe.shape[2],
                                 pooled_dim=pooled.shape[-1], time_ids_dim=None, family="flux",
                                 guidance_embed=bool(tcfg.guidance_embeds))
            cond = {"encoder_hidden_states": pe, "pooled_projections": pooled, "img_ids": img_ids,
                    "txt_ids": text_ids}
            if shape.guidance_embed:
                cond["guidance_in"] = [float(g)]
            cfg = False
        else:
            cfg = g > 1
            pipe._clip_skip = a["clip_skip"]
            pe, npe, pooled, npooled = pipe.encode_prompt(
                prompt=a["prompt"], prompt_2=a["prompt_2"], prompt_3=a["prompt_3"],
                negative_prompt=a["negative_prompt"], negative_prompt_2=a["negative_prompt_2"],
                negative_prompt_3=a["negative_prompt_3"], do_classifier_free_guidance=cfg,
                prompt_embeds=a["prompt_embeds"], negative_prompt_embeds=a["negative_prompt_embeds"],
                pooled_prompt_embeds=a["pooled_prompt_embeds"],
                negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"], device=device,
                clip_skip=a["clip_skip"], num_images_per_prompt=nipp, max_sequence_length=a["max_sequence_length"],
                lora_scale=None)
            b = pe.shape[0]
            if cfg:
                pe, pooled = torch.cat([npe, pe]), torch.cat([npooled, pooled])
            lat = pipe.prepare_latents(b, tcfg.in_channels, height, width, pe.dtype, device, a["generator"],
                                       a["latents"])
            ps = tcfg.patch_size
            targs = pipeline_timestep_args("sd3", pipe.scheduler, a["num_inference_steps"],
                                           (lat.shape[2] // ps) * (lat.shape[3] // ps), sigmas=a["sigmas"],
                                           mu=a["mu"])
            shape = DitLoopShape(batch=lat.shape[0], latent_channels=tcfg.in_channels, latent_height=lat.shape[2],
                                 latent_width=lat.shape[3], cfg=cfg, text_len=pe.shape[1], text_dim=pe.shape[2],
                                 pooled_dim=pooled.shape[-1], time_ids_dim=None, family="sd3")
            cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
        nb = lat.shape[0]  # the embeddings' batch: prepare_latents was given it
        prompt = a["prompt"]
        want = (len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else nb) * nipp
        if nb != want or nb < 1:
            # given prompt_embeds are not repeated for num_images_per_prompt by diffusers' encode_prompt, while its
            # latents are made for batch x num_images_per_prompt (and 0 images fail in it): its own call fails, so
            # must this one
            raise _Fallback(f"{nb} prompt embeddings for {want} images")
        try:  # a shape the executor refuses is diffusers' to run, not an error
            rt.executor.check_shape(shape)
        except TrtkitError as e:
            if pipe.transformer.device.type != torch.device(device).type:  # an engine's profile, and no torch module to run
                raise TrtkitError(f"{e} (the torch transformer is on {pipe.transformer.device}, so diffusers' own "
                                  "loop cannot run it instead)") from None
            raise _Fallback(str(e)) from None
        tables = make_flow_tables(pipe.scheduler, targs)
        # the pipeline's own scheduler ends set up as diffusers leaves it (users read pipe.scheduler.timesteps)
        pipe.scheduler.set_timesteps(device=device, **({k: v for k, v in targs.items() if k != "num_inference_steps"}
                                                       if targs.get("sigmas") is not None else targs))
        pipe._num_timesteps = tables.steps
    t1 = _sync(device)
    out = rt.runner(shape, tables, x_init=lat.float().cpu().numpy(), guidance=g, noise=None, **cond)
    t2 = time.perf_counter()  # runner() returns the latents on the host: the loop is done
    with torch.no_grad():
        res = torch.from_numpy(out).to(device, pe.dtype)
        if a["output_type"] == "latent":
            image: Any = res
        else:
            if kind == "flux":
                res = pipe._unpack_latents(res, height, width, f)
            res = res / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.vae.decode(res.to(pipe.vae.device), return_dict=False)[0]
            image = pipe.image_processor.postprocess(image, output_type=a["output_type"])
    pipe.maybe_free_model_hooks()
    t3 = _sync(device)
    object.__setattr__(pipe, "_trtkit_timings_ms", {"encode": (t1 - t0) * 1e3, "denoise": (t2 - t1) * 1e3,
                                     "decode": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3})
    if not a["return_dict"]:
        return (image,)
    if kind == "flux":
        from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

        return FluxPipelineOutput(images=image)
    from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput

    return StableDiffusion3PipelineOutput(images=image)
