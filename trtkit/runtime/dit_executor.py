"""DiT transformers (FLUX.1, SD3.x) as step executors of the loop runner (graph_runner.LoopRunner).

The runner, its buffers, the fused scheduler kernel and the one-CUDA-graph capture are the UNet's; what a DiT
family brings is its I/O layout (`DitLoopShape.unet_io`) and the call (`DitTorchExecutor`):
  * FLUX: latents packed 2x2 into tokens, (B, (h/2)(w/2), 4C); RoPE ids for image and text tokens
    (`img_ids`, `txt_ids`, float32); the T5 sequence, the CLIP pooled vector, and for guidance-distilled
    FLUX.1-dev the guidance scale as an input (`guidance_in`) instead of a CFG batch. The timestep is the
    scheduler's t in the latents' dtype divided by 1000, as FluxPipeline passes it.
  * SD3: latents (B, C, h, w); CFG with the [negative; prompt] batch of 2B and the pooled projections; the
    timestep is the scheduler's t in float32.
The executor takes any module with the diffusers forward signature: the pipeline's transformer, one whose
repeated blocks are torch.compile'd (`compile_blocks`), or one whose linears were swapped (FP8). Its fingerprint
holds every parameter address, PEFT state and which submodules are compiled, so any of these changes made after
a capture makes the runner capture again instead of replaying a graph of the old module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trtkit.errors import TrtkitError
from trtkit.runtime.executors import UNET_OUTPUT, LoopShape, StepExecutor, as_torch

FAMILIES = ("flux", "sd3")


@dataclass(frozen=True)
class DitLoopShape(LoopShape):
    """A LoopShape whose latent and I/O layout are a DiT family's. FLUX: latent_channels is the transformer's
    in_channels (packed, 4x the VAE's) and latent_height/width the packed token grid; SD3: the VAE latent."""

    family: str = "flux"
    guidance_embed: bool = False  # FLUX.1-dev: guidance scale as a transformer input

    @property
    def latent(self) -> tuple[int, ...]:
        if self.family == "flux":
            return (self.batch, self.latent_height * self.latent_width, self.latent_channels)
        return (self.batch, self.latent_channels, self.latent_height, self.latent_width)

    def unet_io(self) -> dict[str, tuple[tuple[int, ...], str]]:
        b = self.unet_batch
        lat = (b,) + self.latent[1:]
        out: dict[str, tuple[tuple[int, ...], str]] = {
            "sample": (lat, "io"),
            "timestep": ((1,), "f32"),
            "encoder_hidden_states": ((b, self.text_len, self.text_dim), "io"),
            "pooled_projections": ((b, self.pooled_dim or 0), "io"),
        }
        if self.family == "flux":
            out["img_ids"] = ((self.latent_height * self.latent_width, 3), "f32")
            out["txt_ids"] = ((self.text_len, 3), "f32")
            if self.guidance_embed:
                out["guidance_in"] = ((1,), "f32")
        out[UNET_OUTPUT] = (lat, "io")
        return out


def family_of(transformer: Any) -> str:
    """"flux" or "sd3" from the module's diffusers config (compiled wrappers looked through)."""
    base = getattr(transformer, "_orig_mod", transformer)
    cfg = getattr(base, "config", None)
    if cfg is None:
        raise TrtkitError(f"{type(transformer).__name__} has no diffusers config; pass family='flux' or 'sd3'")
    if "axes_dims_rope" in cfg:
        return "flux"
    if "pos_embed_max_size" in cfg or "caption_projection_dim" in cfg:
        return "sd3"
    raise TrtkitError(f"{type(base).__name__} is neither a FluxTransformer2DModel nor an SD3Transformer2DModel")


COMPILE_SCOPES = ("blocks", "whole")


def compile_blocks(transformer: Any, scope: str = "blocks", **compile_kw: Any) -> str:
    """torch.compile of the transformer in place, fullgraph unless told otherwise; returns how it compiled.

    scope "blocks": the repeated blocks only (regional compilation: one compiled graph per block class, reused
    by every block; fp8.regional_compile). Compiles in seconds, and is the one that stays usable once the
    linears are FP8 (a whole-model compile of FP8 FLUX ran past 8 minutes).
    scope "whole": the whole transformer as one graph, so Inductor also fuses across block boundaries and the
    embedders and final layer; longer to compile (FLUX.1-size bf16: see docs/benchmarks.md).
    No CUDA graphs of torch's own either way: the runner captures the whole loop."""
    if scope not in COMPILE_SCOPES:
        raise TrtkitError(f"unknown compile scope {scope!r}; expected one of {', '.join(COMPILE_SCOPES)}")
    kw = {"fullgraph": True, "dynamic": False, **compile_kw}
    if scope == "whole":
        transformer.compile(**kw)
        return "torch.compile of the whole transformer"
    from trtkit.runtime.fp8 import regional_compile

    return regional_compile(transformer, **kw)


def plain_linears(transformer: Any) -> bool:
    """True when every attention projection holds a plain floating-point weight: neither swapped to FP8
    (torchao's tensor subclasses cannot be concatenated by fuse_qkv_projections) nor wrapped by PEFT."""
    import torch

    for name, m in transformer.named_modules():
        if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            w = getattr(m, "weight", None)
            if not isinstance(m, torch.nn.Linear) or type(w.data) is not torch.Tensor or not w.is_floating_point():
                return False
    return True


def compiled_state(module: Any) -> tuple:
    """Names of the submodules that run a torch.compile'd forward (nn.Module.compile) and the wrapper's own."""
    return (type(module).__name__,) + tuple(
        n for n, m in module.named_modules() if getattr(m, "_compiled_call_impl", None) is not None)


class DitTorchExecutor(StepExecutor):
    """One transformer call (FLUX or SD3) in torch on the loop's bound buffers."""

    name = "torch"
    uses_torch_stream = True

    def __init__(self, transformer: Any, family: str | None = None, compile: bool | str = False,
                 attention: str | None = None, fuse_mlp: bool = True) -> None:
        import torch

        self.transformer = transformer
        self.family = family or family_of(transformer)
        if self.family not in FAMILIES:
            raise TrtkitError(f"unknown DiT family {self.family!r}; expected one of {', '.join(FAMILIES)}")
        self.config = getattr(getattr(transformer, "_orig_mod", transformer), "config", None)
        p = next(transformer.parameters())
        self.device = p.device
        self.io_dtype = str(p.dtype).replace("torch.", "")
        if self.io_dtype not in ("float32", "float16", "bfloat16"):  # e.g. an FP8 swap whose first weight is fp8
            self.io_dtype = str(getattr(transformer, "dtype", torch.bfloat16)).replace("torch.", "")
        self.uses_torch_stream = self.device.type == "cuda"
        # compile: False, True (= "blocks") or a scope of compile_blocks
        scope = "blocks" if compile is True else compile or None
        self.compiled = scope is not None
        fused = False
        if scope is not None and self.family == "flux" and plain_linears(transformer):
            # one GEMM for q/k/v of each stream (diffusers' fuse_qkv_projections, the unfused weights made views of
            # the fused ones); with the compiled blocks it is part of the FLUX row in docs/benchmarks.md
            from trtkit.runtime.kernel_choices import fuse_qkv_shared

            fuse_qkv_shared(transformer)
            fused = True
        mlp = 0
        if scope is not None and self.family == "flux" and fuse_mlp:
            # the MLPs' GELU in the GEMM epilogue and proj_out without the concatenation: what Inductor cannot fuse
            # (runtime/dit_fusions.py; measured in docs/benchmarks.md, "FLUX compiled-row variants")
            from trtkit.runtime.dit_fusions import fuse_flux_mlp

            mlp = sum(fuse_flux_mlp(transformer).values())
        if scope is not None:
            compile_blocks(transformer, scope=str(scope))
        from trtkit.runtime.kernel_choices import sdpa_choice

        sdpa_choice(attention)  # checks the name now, not at the first call
        self.options: dict[str, Any] = {"compile": scope or False, "fuse_qkv": fused, "fused_mlp_modules": mlp,
                                        "attention": attention}
        self.shape: DitLoopShape | None = None
        self.t: dict[str, Any] = {}

    def check_shape(self, shape: LoopShape) -> None:
        if not isinstance(shape, DitLoopShape) or shape.family != self.family:
            raise TrtkitError(f"the {self.family} transformer executor needs a DitLoopShape of family {self.family}")
        cfg = self.config
        if cfg is not None:
            if shape.latent_channels != cfg.in_channels:
                raise TrtkitError(f"latent channels {shape.latent_channels} != transformer in_channels "
                                  f"{cfg.in_channels}")
            if shape.text_dim != cfg.joint_attention_dim:
                raise TrtkitError(f"text embeddings width {shape.text_dim} != transformer joint_attention_dim "
                                  f"{cfg.joint_attention_dim}")
            if shape.pooled_dim != cfg.pooled_projection_dim:
                raise TrtkitError(f"pooled embeddings width {shape.pooled_dim} != transformer "
                                  f"pooled_projection_dim {cfg.pooled_projection_dim}")
            if self.family == "flux" and bool(cfg.guidance_embeds) != shape.guidance_embed:
                raise TrtkitError(f"transformer guidance_embeds={cfg.guidance_embeds}, loop guidance input "
                                  f"{shape.guidance_embed}")
            if self.family == "sd3":
                ps, mx = cfg.patch_size, cfg.pos_embed_max_size
                if shape.latent_height % ps or shape.latent_width % ps:
                    raise TrtkitError(f"latent {shape.latent_height}x{shape.latent_width} is not a multiple of the "
                                      f"transformer's patch size {ps}")
                if mx is not None and max(shape.latent_height, shape.latent_width) // ps > mx:
                    raise TrtkitError(f"latent {shape.latent_height}x{shape.latent_width} is larger than the "
                                      f"transformer's position embedding ({mx} patches of {ps})")
        self.shape = shape

    def bind(self, arrays: dict[str, Any]) -> None:
        if self.shape is None:  # pragma: no cover - the runner checks the shape before it binds
            raise RuntimeError("DitTorchExecutor.bind before check_shape")
        kinds = self.shape.unet_io()
        self.t = {k: as_torch(a, "float32" if kinds[k][1] == "f32" else self.io_dtype) for k, a in arrays.items()}

    def __call__(self, stream: int) -> None:
        import torch

        t, b = self.t, self.shape.unet_batch  # type: ignore[union-attr]
        if self.uses_torch_stream and torch.cuda.current_stream().cuda_stream != stream:  # pragma: no cover
            raise RuntimeError("DitTorchExecutor called outside the loop's torch stream")
        from trtkit.runtime.kernel_choices import sdpa_choice

        with torch.no_grad(), sdpa_choice(self.options["attention"]):
            if self.family == "flux":
                # FluxPipeline: t.expand(B).to(latents.dtype) / 1000, guidance float32 expanded to B
                ts = t["timestep"].expand(b).to(t["sample"].dtype) / 1000
                g = t["guidance_in"].expand(b) if "guidance_in" in t else None
                out = self.transformer(hidden_states=t["sample"], timestep=ts, guidance=g,
                                       pooled_projections=t["pooled_projections"],
                                       encoder_hidden_states=t["encoder_hidden_states"], txt_ids=t["txt_ids"],
                                       img_ids=t["img_ids"], joint_attention_kwargs=None, return_dict=False)[0]
            else:
                out = self.transformer(hidden_states=t["sample"], timestep=t["timestep"].expand(b),
                                       encoder_hidden_states=t["encoder_hidden_states"],
                                       pooled_projections=t["pooled_projections"], joint_attention_kwargs=None,
                                       return_dict=False)[0]
            t[UNET_OUTPUT].copy_(out)

    def fingerprint(self) -> tuple:
        # weight addresses + PEFT state (a swapped or reloaded module has new ones) and compiled submodules
        from trtkit.runtime.lora import graph_state

        return (id(self.transformer), graph_state(self.transformer), compiled_state(self.transformer))
