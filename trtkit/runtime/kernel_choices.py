"""The torch UNet's kernel choices: the attention backends, the `--kernels` presets, fusing q/k/v without a
second copy of the weights, and a label for a set of choices. TorchExecutor (executors.py) applies them."""

from __future__ import annotations

from typing import Any

from trtkit.errors import TrtkitError

ATTENTION_BACKENDS = ("flash", "efficient", "cudnn", "math")

# What `--kernels` picks for the torch UNet on a GPU, for the eager UNet and under torch.compile. Measured on an
# H200 with benchmarks/bench_kernels.py and bench_loop.py (docs/benchmarks.md), loop graph per step against plain:
#   eager "tuned": SD 1.5 -37%, SDXL -18%. channels_last + cudnn_benchmark alone: SD 1.5 -14%, SDXL +5% (layout
#     copies around torch's NCHW-only GroupNorm and diffusers' NCHW transformer outputs), then nhwc_group_norm,
#     nhwc_transformer, fused_geglu (-8% on SDXL) and fuse_qkv (-1.4%; no extra weights since its views). The
#     attention backend stays torch's: none was faster.
#   compiled "tuned": channels_last, nhwc_transformer and fuse_qkv (SDXL -3.4%); Inductor fuses GroupNorm and
#     GEGLU itself, and cudnn_benchmark and conv_1x1_as_mm gained nothing on top.
KERNEL_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "plain": {"eager": {}, "compiled": {}},
    "tuned": {"eager": {"channels_last": True, "cudnn_benchmark": True, "nhwc_group_norm": True,
                        "nhwc_transformer": True, "fused_geglu": True, "fuse_qkv": True},
              "compiled": {"channels_last": True, "nhwc_transformer": True, "fuse_qkv": True}},
}


def kernel_options(preset: str, device: str, compile: bool) -> dict[str, Any]:
    """TorchExecutor options for a preset on this device and UNet (eager or torch.compile'd). The choices are
    for a GPU: on the CPU every preset is plain."""
    if preset not in KERNEL_PRESETS:
        raise TrtkitError(f"unknown kernel preset {preset!r}; choose one of {', '.join(KERNEL_PRESETS)}")
    if device != "cuda":
        return {}
    opts = dict(KERNEL_PRESETS[preset]["compiled" if compile else "eager"])
    if not triton_available():  # a torch build without triton: the rest still helps
        opts.pop("nhwc_group_norm", None)
        opts.pop("fused_geglu", None)
    return opts


def triton_available() -> bool:
    from trtkit.runtime import nhwc

    return nhwc.available()


def fuse_qkv_shared(unet: Any) -> None:
    """diffusers' fuse_qkv_projections(), then each unfused projection's weight and bias made a view of its rows
    of the fused ones: diffusers keeps both copies (about 1 GiB more for SDXL), and unfuse still works."""
    from torch import nn

    if not hasattr(unet, "fuse_qkv_projections"):
        raise TrtkitError("fuse_qkv needs a diffusers model with fuse_qkv_projections()")
    unet.fuse_qkv_projections()
    from trtkit.runtime.lora import unfuse_wrapped

    unfuse_wrapped(unet)  # attentions whose q/k/v carry PEFT LoRA layers stay unfused
    for m in unet.modules():
        if not getattr(m, "fused_projections", False):
            continue
        if getattr(m, "to_qkv", None) is not None:
            pairs = [(m.to_qkv, [m.to_q, m.to_k, m.to_v])]
        else:
            pairs = [(m.to_kv, [m.to_k, m.to_v])]
        if getattr(m, "to_added_qkv", None) is not None:  # MM-DiT (FLUX) context stream
            pairs.append((m.to_added_qkv, [m.add_q_proj, m.add_k_proj, m.add_v_proj]))
        for fused, parts in pairs:
            for attr in ("weight", "bias"):
                whole = getattr(fused, attr, None)
                if whole is None:
                    continue
                start = 0
                for lin in parts:
                    n = lin.out_features
                    setattr(lin, attr, nn.Parameter(whole.data[start:start + n], requires_grad=False))
                    start += n


def sdpa_choice(attention: str | None) -> Any:
    """A context that makes torch's scaled_dot_product_attention use one backend (ATTENTION_BACKENDS), or
    torch's own choice for None."""
    import contextlib

    if not attention:
        return contextlib.nullcontext()
    if attention not in ATTENTION_BACKENDS:
        raise TrtkitError(f"unknown attention backend {attention!r}; expected one of {', '.join(ATTENTION_BACKENDS)}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[attention])


def describe_options(options: dict[str, Any], sep: str = ",") -> str:
    """TorchExecutor options as one label: the choices in effect, `name=value` where the value is not True,
    Inductor settings flattened in ("channels_last,attention=cudnn,conv_1x1_as_mm"); "" for none."""
    flat = {k: v for k, v in options.items() if k != "compile_options"} | dict(options.get("compile_options") or {})
    return sep.join(k if v is True else f"{k}={v}" for k, v in flat.items() if v)
