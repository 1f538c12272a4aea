"""ControlNet(s) + UNet as one step of the loop (graph_runner.py), and a ControlNet pipeline call's control
arguments as diffusers' StableDiffusion(XL)ControlNetPipeline turns them into tensors.

Per step, as diffusers' loop does: each ControlNet runs on the UNet's input (the CFG batch, or its conditional half
in guess mode), the timestep, the text conditioning (+ SDXL's added conditions) and its conditioning image, with
its conditioning scale times the step's keep weight (control_guidance_start / end); the residuals of several
ControlNets are summed in order (MultiControlNetModel), then the UNet runs with them. The images and the per-step
scale table are loop buffers (device values on a GPU): a new image or scale is an upload, not a new capture. The
table is indexed on the device by the loop's step counter (StepExecutor.reads_step).

The ControlNets get the UNet's kernel choices (TorchExecutor options: channels-last, fused q/k/v, NHWC GroupNorm
and Transformer2D, fused GEGLU): ControlNetModel is built from the same diffusers blocks, so each net is tuned by a
TorchExecutor of its own whose module (compiled or not) is called; its q/k/v are fused by the UNet's method
(_fuse_like_the_unet).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trtkit.errors import TrtkitError
from trtkit.runtime.executors import UNET_OUTPUT, LoopShape, StepExecutor, TorchExecutor, as_torch

CONTROL_SCALE = "controlnet_scale"  # (steps, n_nets) float32: conditioning scale x keep weight of each step


def control_image(k: int) -> str:
    return f"controlnet_cond_{k}"


# The call arguments a ControlNet pipeline adds that the runtime reproduces (accelerate.py HANDLED adds these).
CONTROL_ARGS = ("image", "controlnet_conditioning_scale", "guess_mode", "control_guidance_start",
                "control_guidance_end")


def controlnets(module: Any) -> list[Any]:
    """The ControlNetModels of a pipeline's `controlnet` (one, or a MultiControlNetModel's nets in order)."""
    return list(module.nets) if hasattr(module, "nets") else [module]


def _fuse_like_the_unet(net: Any) -> None:
    """Give `net` the UNet's fuse/unfuse_qkv_projections. ControlNetModel's own (diffusers' AttentionMixin) fuses
    only AttentionModuleMixin modules, which its blocks' Attention is not (diffusers 0.42: nothing fused); the UNet's
    fuses every Attention and sets the fused processor, and runs unchanged on ControlNetModel (same blocks, same
    attn_processors / set_attn_processor)."""
    import types

    from diffusers import UNet2DConditionModel

    if type(net).fuse_qkv_projections is UNet2DConditionModel.fuse_qkv_projections:
        return
    net.fuse_qkv_projections = types.MethodType(UNet2DConditionModel.fuse_qkv_projections, net)
    net.unfuse_qkv_projections = types.MethodType(UNet2DConditionModel.unfuse_qkv_projections, net)


class ControlNetExecutor(StepExecutor):
    """ControlNets + UNet in torch on the loop's buffers: a TorchExecutor for the UNet and one per ControlNet (the
    same kernel options); this class calls their modules in diffusers' order."""

    name = "torch+controlnet"
    reads_step = True

    def __init__(self, unet: Any, nets: list[Any], compile: bool = False, **options: Any) -> None:
        if not nets:
            raise TrtkitError("a ControlNet pipeline needs at least one ControlNetModel")
        for n in nets:
            if next(n.parameters()).dtype != next(unet.parameters()).dtype or n.device != unet.device:
                raise TrtkitError(f"the ControlNet is {n.dtype} on {n.device}, the UNet {unet.dtype} on {unet.device}"
                                  ": give them the same dtype and device (pipe.to(...))")
            if getattr(n.config, "time_cond_proj_dim", None) is not None or n.config.class_embed_type is not None:
                raise TrtkitError("ControlNets with class or guidance embeddings are not supported by the runtime")
        self.unet_ex = TorchExecutor(unet, compile=compile, **options)
        if options.get("fuse_qkv"):
            for n in nets:
                _fuse_like_the_unet(n)
        self.net_exs = [TorchExecutor(n, compile=compile, **options) for n in nets]
        self.io_dtype = self.unet_ex.io_dtype
        self.uses_torch_stream = self.unet_ex.uses_torch_stream
        self.options = self.unet_ex.options
        self.guess_mode = False  # set per call (configure): part of what a captured graph bakes in
        self.split = False  # guess mode with CFG: the ControlNets see only the conditional half
        self.t: dict[str, Any] = {}

    @property
    def nets(self) -> list[Any]:
        return [e.unet for e in self.net_exs]

    def configure(self, guess_mode: bool, cfg: bool) -> None:
        self.guess_mode = bool(guess_mode)
        self.split = bool(guess_mode and cfg)

    def image_size(self, shape: LoopShape) -> tuple[int, int]:
        """The conditioning image's size for a latent: each net's conditioning embedding downsamples it by
        2 ** (len(conditioning_embedding_out_channels) - 1) to the latent's size."""
        f = {2 ** (len(n.config.conditioning_embedding_out_channels) - 1) for n in self.nets}
        if len(f) != 1:
            raise TrtkitError(f"the ControlNets downsample their images differently ({sorted(f)})")
        k = f.pop()
        return shape.latent_height * k, shape.latent_width * k

    def check_shape(self, shape: LoopShape) -> None:
        self.unet_ex.check_shape(shape)
        for e in self.net_exs:
            e.check_shape(shape)

    def extra_io(self, shape: LoopShape, steps: int) -> dict[str, tuple[tuple[int, ...], str]]:
        h, w = self.image_size(shape)
        out: dict[str, tuple[tuple[int, ...], str]] = {
            control_image(k): ((shape.unet_batch, n.config.conditioning_channels, h, w), "io")
            for k, n in enumerate(self.nets)}
        out[CONTROL_SCALE] = ((steps, len(self.nets)), "f32")
        return out

    def bind(self, arrays: dict[str, Any]) -> None:
        mine = {k for k in arrays if k.startswith("controlnet_") or k == "step"}
        self.unet_ex.bind({k: v for k, v in arrays.items() if k not in mine})
        t = dict(self.unet_ex.t)
        for k in mine:
            dt = {"step": "int32", CONTROL_SCALE: "float32"}.get(k, self.io_dtype)
            t[k] = as_torch(arrays[k], dt)
        self.t = t

    def __call__(self, stream: int) -> None:
        import torch

        t = self.t
        if self.uses_torch_stream and torch.cuda.current_stream().cuda_stream != stream:  # pragma: no cover
            raise RuntimeError("ControlNetExecutor called outside the loop's torch stream")
        sdxl = self.unet_ex.sdxl
        half = t["sample"].shape[0] // 2 if self.split else 0  # guess mode + CFG: the conditional half only

        def cn(x: Any) -> Any:
            return x[half:] if half else x

        added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]} if sdxl else None
        with torch.no_grad(), self.unet_ex._kernel_choice():
            scales = t[CONTROL_SCALE].index_select(0, t["step"])[0]  # this step's row, read on the device
            down: Any = None
            mid: Any = None
            for k, ex in enumerate(self.net_exs):
                kw: dict[str, Any] = {}
                if ex.sdxl:
                    kw["added_cond_kwargs"] = {n: cn(v) for n, v in (added or {}).items()}
                d, m = ex.fn(cn(t["sample"]), t["timestep0"], encoder_hidden_states=cn(t["encoder_hidden_states"]),
                             controlnet_cond=cn(t[control_image(k)]), conditioning_scale=scales[k],
                             guess_mode=self.guess_mode, return_dict=False, **kw)
                if down is None:  # MultiControlNetModel's merge: summed in the nets' order
                    down, mid = list(d), m
                else:
                    down = [a + b for a, b in zip(down, d, strict=True)]
                    mid = mid + m
            if half:  # the unconditional half gets no control, as diffusers adds zeros to it
                down = [torch.cat([torch.zeros_like(d), d]) for d in down]
                mid = torch.cat([torch.zeros_like(mid), mid])
            out = self.unet_ex.fn(t["sample"], t["timestep0"], encoder_hidden_states=t["encoder_hidden_states"],
                                  down_block_additional_residuals=down, mid_block_additional_residual=mid,
                                  added_cond_kwargs=added, return_dict=False)[0]
            t[UNET_OUTPUT].copy_(out)

    def refresh(self) -> None:
        self.unet_ex.refresh()
        for e in self.net_exs:
            e.refresh()

    def fingerprint(self) -> tuple:
        return (self.unet_ex.fingerprint(), tuple(e.fingerprint() for e in self.net_exs), self.guess_mode,
                self.split)


class ControlCall:
    """One ControlNet pipeline call's control arguments, normalised as diffusers' __call__ does (guidance start /
    end as lists, a float scale repeated for each net, guess mode forced by global_pool_conditions), its images
    prepared by the pipeline's own prepare_image, and the per-step scale table its loop computes."""

    def __init__(self, pipe: Any, image: Any, controlnet_conditioning_scale: Any, guess_mode: bool,
                 control_guidance_start: Any, control_guidance_end: Any) -> None:
        self.pipe = pipe
        self.nets = controlnets(pipe.controlnet)
        self.multi = hasattr(pipe.controlnet, "nets")
        start, end = control_guidance_start, control_guidance_end
        if not isinstance(start, list) and isinstance(end, list):
            start = len(end) * [start]
        elif not isinstance(end, list) and isinstance(start, list):
            end = len(start) * [end]
        elif not isinstance(start, list) and not isinstance(end, list):
            start, end = len(self.nets) * [start], len(self.nets) * [end]
        self.start, self.end = start, end
        self.image = image
        self.scale = controlnet_conditioning_scale
        self.guess_mode = bool(guess_mode) or bool(self.nets[0].config.global_pool_conditions)
        self.images: list[Any] = []

    def check_kwargs(self) -> dict[str, Any]:
        """What diffusers' check_inputs is given (before it repeats a float scale for each net)."""
        return {"image": self.image, "controlnet_conditioning_scale": self.scale,
                "control_guidance_start": self.start, "control_guidance_end": self.end}

    def prepare(self, height: int | None, width: int | None, batch: int, num_images_per_prompt: int, device: Any,
                cfg: bool) -> tuple[int, int]:
        """The conditioning images as diffusers' prepare_image makes them (resized to height x width, or the
        image's own size when unset; [0, 1]; repeated for the batch), each at the UNet's CFG batch: in guess mode
        diffusers does not repeat it for CFG, and the executor then reads only its second half. Returns the size
        the images give the call (diffusers' height and width from here on)."""
        import torch
        from diffusers.pipelines.controlnet.pipeline_controlnet import StableDiffusionControlNetPipeline

        images = self.image if self.multi else [self.image]
        if self.multi and isinstance(self.pipe, StableDiffusionControlNetPipeline) and isinstance(images[0], list):
            images = [list(t) for t in zip(*images, strict=False)]  # SD's nested lists: one list per net
        self.images = []
        for img in images:
            x = self.pipe.prepare_image(image=img, width=width, height=height, batch_size=batch,
                                        num_images_per_prompt=num_images_per_prompt, device=device,
                                        dtype=self.pipe.controlnet.dtype, do_classifier_free_guidance=cfg,
                                        guess_mode=self.guess_mode)
            if cfg and self.guess_mode:
                x = torch.cat([x] * 2)
            self.images.append(x)
        h, w = self.images[0].shape[-2:]
        return int(h), int(w)

    def scale_table(self, steps: int) -> np.ndarray:
        """(steps, n_nets): each net's conditioning scale times diffusers' keep weight for step i (0 outside
        [control_guidance_start, control_guidance_end] as fractions of the steps), float products as diffusers'."""
        scale = self.scale
        if self.multi and isinstance(scale, float):
            scale = [scale] * len(self.nets)
        rows = []
        for i in range(steps):
            keeps = [1.0 - float(i / steps < s or (i + 1) / steps > e) for s, e in zip(self.start, self.end, strict=False)]
            if self.multi:
                rows.append([c * s for c, s in zip(scale, keeps, strict=False)])
            else:
                rows.append([(scale[0] if isinstance(scale, list) else scale) * keeps[0]])
        return np.asarray(rows, np.float32)

    def inputs(self, executor: ControlNetExecutor, steps: int, cfg: bool) -> dict[str, Any]:
        """The loop inputs of this call (LoopRunner.set_inputs), after telling the executor its guess mode."""
        if len(self.images) != len(executor.nets):
            raise TrtkitError(f"{len(self.images)} control images for {len(executor.nets)} ControlNets")
        executor.configure(self.guess_mode, cfg)
        return {**{control_image(k): x for k, x in enumerate(self.images)}, CONTROL_SCALE: self.scale_table(steps)}
