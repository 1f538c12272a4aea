"""Step executors: one UNet call on buffers bound once.

The loop (graph_runner.py) owns every buffer; an executor is told their addresses once (`bind`) and
then, per step, reads `sample`, `timestep` and the conditioning and writes `noise_pred` (`__call__`).
Two implementations:
  * TorchExecutor: the diffusers UNet in torch (fp16 on a GPU, optionally torch.compile'd). It sees the
    loop's cuda-python buffers as torch tensors without copies (DLPack, or the CUDA array interface).
  * TensorRTExecutor: a TensorRT engine (engine.py), `execute_async_v3` on the loop's stream; no torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from trtkit.errors import TrtkitError
from trtkit.runtime.kernel_choices import ATTENTION_BACKENDS, fuse_qkv_shared, sdpa_choice, triton_available
from trtkit.runtime.kernel_choices import KERNEL_PRESETS as KERNEL_PRESETS
from trtkit.runtime.kernel_choices import describe_options as describe_options
from trtkit.runtime.kernel_choices import kernel_options as kernel_options

# (The three `x as x` imports above re-export the kernel choices from their old home here.)

# The UNet's I/O names, as the exporter writes them (foundation contract).
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
UNET_OUTPUT = "noise_pred"


@dataclass(frozen=True)
class LoopShape:
    """Shapes of one denoising loop: everything a captured graph depends on besides addresses."""

    batch: int  # images
    latent_channels: int
    latent_height: int
    latent_width: int
    cfg: bool
    text_len: int
    text_dim: int
    pooled_dim: int | None  # SDXL text_embeds width; None for SD 1.x/2.x
    time_ids_dim: int | None

    @property
    def unet_batch(self) -> int:
        return self.batch * (2 if self.cfg else 1)

    @property
    def latent(self) -> tuple[int, ...]:
        return (self.batch, self.latent_channels, self.latent_height, self.latent_width)

    def unet_io(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, kind); kind "io" takes the executor's dtype, "f32" is float32."""
        b = self.unet_batch
        out: dict[str, tuple[tuple[int, ...], str]] = {
            "sample": ((b, self.latent_channels, self.latent_height, self.latent_width), "io"),
            "timestep": ((1,), "f32"),
            "encoder_hidden_states": ((b, self.text_len, self.text_dim), "io"),
        }
        if self.pooled_dim is not None:
            out["text_embeds"] = ((b, self.pooled_dim), "io")
            out["time_ids"] = ((b, self.time_ids_dim or 6), "io")
        out[UNET_OUTPUT] = ((b, self.latent_channels, self.latent_height, self.latent_width), "io")
        return out


class StepExecutor(ABC):
    """One UNet evaluation on bound buffers."""

    name: str = "executor"
    io_dtype: str = "float32"  # dtype of sample / conditioning / noise_pred
    uses_torch_stream: bool = False  # True: the runner captures with torch.cuda.graph (see graph_runner)

    @abstractmethod
    def check_shape(self, shape: LoopShape) -> None:
        """Raise TrtkitError (one line) if this executor cannot run `shape`."""

    @abstractmethod
    def bind(self, arrays: dict[str, Any]) -> None:
        """Remember the buffers (numpy arrays on the CPU, cuda.DeviceArray on a GPU); called once per shape."""

    @abstractmethod
    def __call__(self, stream: int) -> None:
        """Enqueue one UNet call on `stream` (0 on the CPU)."""

    def fingerprint(self) -> tuple:
        """Anything besides the bound buffers that a captured graph bakes in (weight addresses...)."""
        return ()

    def capturable(self, stream: int) -> bool:
        """Whether a call on `stream` may be stream-captured (TensorRT-RTX can say no)."""
        return True

    # Inputs besides the UNet's that the loop allocates and binds for this executor (e.g. ControlNet images and a
    # per-step scale table): name -> (shape, kind) as LoopShape.unet_io gives them. They are device values: set
    # through LoopRunner.set_inputs, changed without a new capture.
    def extra_io(self, shape: LoopShape, steps: int) -> dict[str, tuple[tuple[int, ...], str]]:
        return {}

    # True: bind() also gets "step", the loop's int32 step counter (the index of the step being run), so a
    # per-step table can be read on the device.
    reads_step: bool = False

    def refresh(self) -> None:
        """Called before every loop: adapt to what the user changed on the model since (e.g. LoRA loaded)."""
        return None

    def adapt_tables(self, tables: Any) -> Any:
        """The scheduler's StepTables as this executor's model wants its timestep row (the loop writes that row
        into the timestep buffer): unchanged, except for inputs in another convention (dit_engine.py)."""
        return tables


# ------------------------------------------------------------------------------------------------
# torch


def as_torch(arr: Any, dtype: str) -> Any:
    """A torch tensor over `arr`'s memory (no copy): numpy via from_numpy, device arrays via DLPack
    (cuda.core's Buffer exports it) or, where cuda.core is missing, the CUDA array interface."""
    import torch

    tdt = getattr(torch, dtype)
    if isinstance(arr, np.ndarray):
        host = torch.from_numpy(arr)
        return host if dtype == str(arr.dtype) else host.view(tdt)
    from trtkit.runtime.cuda import DeviceArray

    assert isinstance(arr, DeviceArray)
    t: Any = None
    try:
        try:
            from cuda.core import Buffer
        except ImportError:
            from cuda.core.experimental import Buffer
        buf = Buffer.from_handle(arr.ptr, arr.nbytes)
        raw = torch.from_dlpack(buf)
        if raw.data_ptr() == arr.ptr and raw.numel() * raw.element_size() == arr.nbytes:
            t = raw.view(torch.uint8).view(tdt).view(arr.shape)
            t._trtkit_owner = (buf, arr)
    except Exception:
        t = None
    if t is None:
        typestr = {"float32": "<f4", "float16": "<f2", "bfloat16": "<f2", "int32": "<i4"}[dtype]

        class _Cai:
            __cuda_array_interface__ = {"shape": tuple(arr.shape), "typestr": typestr, "data": (arr.ptr, False),
                                        "version": 2, "strides": None}

        t = torch.as_tensor(_Cai(), device="cuda")
        if dtype == "bfloat16":
            t = t.view(torch.bfloat16)
    if t.data_ptr() != arr.ptr:  # pragma: no cover - a bridge that copied would break the graph silently
        raise RuntimeError("the torch view of a device buffer is not zero-copy")
    return t


class TorchExecutor(StepExecutor):
    """The diffusers UNet in torch. `compile=True` wraps it in torch.compile (no CUDA graphs of its own:
    the runner captures the whole loop).

    Kernel choices (each changes which kernels the captured graph holds; the function stays, the rounding may not):
      * channels_last: the UNet's weights in NHWC (converted in place), so cuDNN runs its fp16 tensor-core
        convolutions without NCHW<->NHWC transposes around each one.
      * cudnn_benchmark: cuDNN times its algorithms on the first call of each shape instead of taking its
        heuristic's pick. Set only while the UNet runs (a context, not the process-wide flag), because the
        pick is cached per shape and a graph keeps the kernel it captured.
      * attention: one scaled-dot-product backend ("flash", "efficient", "cudnn", "math"), else torch's choice.
      * fuse_qkv: diffusers' fuse_qkv_projections() (one GEMM for q, k and v of each self-attention, one for
        k and v of each cross-attention); the unfused weights become views of the fused ones (no second copy).
      * nhwc_group_norm: with channels_last, every GroupNorm reads and writes NHWC itself (runtime/nhwc.py)
        instead of torch's NCHW-only kernel and the two layout copies around it.
      * nhwc_transformer: with channels_last, every Transformer2D block hands back channels-last activations
        (diffusers makes them NCHW with a copy, and everything after pays for it; runtime/nhwc.py).
      * fused_geglu: each GEGLU's chunk, gelu and product as one Triton kernel (runtime/geglu.py).
      * compile_options: Inductor settings for torch.compile (its `options`), e.g. {"conv_1x1_as_mm": True}.
    """

    name = "torch"
    uses_torch_stream = True

    def __init__(self, unet: Any, compile: bool = False, compile_mode: str | None = None, *,
                 channels_last: bool = False, cudnn_benchmark: bool = False, attention: str | None = None,
                 fuse_qkv: bool = False, nhwc_group_norm: bool = False, nhwc_transformer: bool = False,
                 fused_geglu: bool = False, compile_options: dict[str, Any] | None = None) -> None:
        import torch

        for name, on in (("nhwc_group_norm", nhwc_group_norm), ("nhwc_transformer", nhwc_transformer)):
            if on and not channels_last:
                raise TrtkitError(f"{name} needs channels_last (it works on channels-last activations)")
        if nhwc_group_norm and compile:
            raise TrtkitError("nhwc_group_norm is for the eager UNet; torch.compile fuses GroupNorm itself")
        if fused_geglu and compile:
            raise TrtkitError("fused_geglu is for the eager UNet; torch.compile fuses GEGLU itself")
        if compile_options and not compile:
            raise TrtkitError("compile_options are Inductor settings: they need compile=True")
        if compile_options and compile_mode:
            raise TrtkitError("give torch.compile either a mode or compile_options, not both")
        if attention is not None and attention not in ATTENTION_BACKENDS:
            raise TrtkitError(f"unknown attention backend {attention!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
        self.unet = unet
        p = next(unet.parameters())
        self.device = p.device
        self.io_dtype = str(p.dtype).replace("torch.", "")
        self.uses_torch_stream = self.device.type == "cuda"
        self.sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        if (nhwc_group_norm or fused_geglu) and not triton_available():
            raise TrtkitError("nhwc_group_norm and fused_geglu need triton (it ships with torch's CUDA builds)")
        if fuse_qkv:
            fuse_qkv_shared(unet)
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        if nhwc_group_norm or nhwc_transformer:
            from trtkit.runtime import nhwc

            if nhwc_group_norm:
                nhwc.swap_group_norms(unet)
            if nhwc_transformer:
                nhwc.swap_transformers(unet)
        if fused_geglu:
            from trtkit.runtime import geglu

            geglu.swap_geglus(unet)
        self.options: dict[str, Any] = {"channels_last": channels_last, "cudnn_benchmark": cudnn_benchmark, "attention": attention,
                        "fuse_qkv": fuse_qkv, "nhwc_group_norm": nhwc_group_norm,
                        "nhwc_transformer": nhwc_transformer, "fused_geglu": fused_geglu,
                        "compile_options": dict(compile_options or {})}
        self.fn = unet
        if compile:
            try:  # torch checks the option names here, not at the first call
                self.fn = torch.compile(unet, fullgraph=True, mode=compile_mode, options=compile_options or None)
            except RuntimeError as e:
                why = str(e).splitlines()[0].split(", known options")[0]  # torch appends all ~500 names
                raise TrtkitError(f"torch.compile refused compile_options {compile_options}: {why}") from None
        self.compiled = compile
        self.t: dict[str, Any] = {}

    def _kernel_choice(self) -> Any:
        import contextlib

        import torch

        stack = contextlib.ExitStack()
        if self.options["cudnn_benchmark"] and not torch.backends.cudnn.benchmark:
            # only this flag: cudnn.flags() would also reset the others, and its signature varies by version
            torch.backends.cudnn.benchmark = True
            stack.callback(setattr, torch.backends.cudnn, "benchmark", False)
        stack.enter_context(sdpa_choice(self.options["attention"]))
        return stack

    def check_shape(self, shape: LoopShape) -> None:
        cfg = self.unet.config
        if shape.latent_channels != cfg.in_channels:
            raise TrtkitError(f"latent channels {shape.latent_channels} != UNet in_channels {cfg.in_channels}")
        cross = cfg.cross_attention_dim
        cross = cross[0] if isinstance(cross, (list, tuple)) else cross
        if shape.text_dim != cross:
            raise TrtkitError(f"encoder_hidden_states width {shape.text_dim} != UNet cross_attention_dim {cross}")
        if self.sdxl and shape.pooled_dim is None:
            raise TrtkitError("this UNet takes SDXL added conditions (text_embeds, time_ids); none were given")
        if self.sdxl:
            want = cfg.projection_class_embeddings_input_dim
            got = shape.pooled_dim + (shape.time_ids_dim or 6) * cfg.addition_time_embed_dim
            if want != got:
                raise TrtkitError(f"text_embeds {shape.pooled_dim} + time_ids give {got} added features, "
                                  f"the UNet expects {want}")
        # No size rule beyond the pipeline's multiple of 8: diffusers' UNet passes the skip connections' sizes to
        # its upsamplers when the latent is not a multiple of 2**upsamplers (520x512: latent 65x64), and the tuned
        # kernels and the loop graph mask every edge (test_accelerate_calls.py::test_size_not_a_multiple_of_64 on
        # the CPU, test_executors.py::test_tuned_executor_graph_equals_eager_and_plain[hw1] on a GPU).

    def bind(self, arrays: dict[str, Any]) -> None:
        t = {}
        for name, arr in arrays.items():
            dt = "float32" if name == "timestep" else self.io_dtype
            t[name] = as_torch(arr, dt)
            if str(t[name].dtype) != f"torch.{dt}":  # pragma: no cover
                raise RuntimeError(f"{name}: bound as {t[name].dtype}, expected {dt}")
        # diffusers pipelines pass the timestep as a 0-d tensor: a view keeps torch.compile's guards the same
        t["timestep0"] = t["timestep"][0]
        self.t = t

    def __call__(self, stream: int) -> None:
        import torch

        t = self.t
        if self.uses_torch_stream and torch.cuda.current_stream().cuda_stream != stream:  # pragma: no cover
            raise RuntimeError("TorchExecutor called outside the loop's torch stream")
        kw: dict[str, Any] = {}
        if self.sdxl:
            kw["added_cond_kwargs"] = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}
        with torch.no_grad(), self._kernel_choice():
            out = self.fn(t["sample"], t["timestep0"], encoder_hidden_states=t["encoder_hidden_states"],
                          return_dict=False, **kw)[0]
            t[UNET_OUTPUT].copy_(out)

    def refresh(self) -> None:
        if self.options["fuse_qkv"]:  # a LoRA loaded after accelerate() wraps q/k/v that were fused before
            from trtkit.runtime.lora import unfuse_wrapped

            unfuse_wrapped(self.unet)

    def fingerprint(self) -> tuple:
        # A graph bakes in the weights' addresses (replacing a parameter, not updating it in place, needs a new
        # capture) and PEFT's LoRA state: active adapters and their scales, merged or not (runtime/lora.py).
        from trtkit.runtime.lora import graph_state

        return graph_state(self.unet)


# ------------------------------------------------------------------------------------------------
# TensorRT


class TensorRTExecutor(StepExecutor):
    """A TensorRT UNet engine (engine.Engine) run with execute_async_v3 on the loop's stream."""

    name = "tensorrt"
    uses_torch_stream = False

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.io_dtype = engine.dtype_of(UNET_OUTPUT)

    def check_shape(self, shape: LoopShape) -> None:
        self.engine.check_shapes({k: s for k, (s, _) in shape.unet_io().items() if k != UNET_OUTPUT})

    def bind(self, arrays: dict[str, Any]) -> None:
        self.engine.bind(arrays)

    def __call__(self, stream: int) -> None:
        self.engine.execute(stream)

    def fingerprint(self) -> tuple:
        return self.engine.fingerprint()

    def capturable(self, stream: int) -> bool:
        return bool(self.engine.capturable(stream))
