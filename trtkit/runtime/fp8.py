"""FP8 on Hopper without TensorRT: a DiT transformer's linears as torchao FP8 GEMMs with STATIC activation
scales taken from trtkit's calibration, so the torch model and the Q/DQ ONNX quantize every input with the
same scale (amax / 448, E4M3).

* `amax_from_calibration(path)`: the linear-input ranges of a calibration file (trtkit/calibfile.py, read
  here without trtkit/calibration/, which the runtime may not import).
* `plan_fp8(transformer, amax)`: which nn.Linear gets FP8, with which scale, and why the others do not. Pure
  torch-module inspection, no torchao: the CPU tests check it.
* `quantize_fp8(transformer, amax)`: torchao's `Float8StaticActivationFloat8WeightConfig` per module, applied
  in one `quantize_` call through `FqnToConfig`. Weights are per-tensor: torchao 0.18 uses one granularity
  for the weight and the activation of this config, and a static activation scale must be per-tensor (one
  scale for any batch and token count). The Q/DQ ONNX quantizes weights per output channel, so the weight
  rounding differs slightly between the two paths; the activation scales are the same numbers.
* `regional_compile(transformer)`: torch.compile of the repeated blocks only (diffusers'
  `compile_repeated_blocks` where the class lists them, else each block of the block lists), compiled once
  and reused by every block of a class; a whole-model compile of FP8 FLUX ran past 8 minutes.

torchao's kernels do the GEMMs (torch._scaled_mm, or MSLK where installed); nothing here is a kernel.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtkit.errors import TrtkitError

FP8_MAX = 448.0  # E4M3: the Q/DQ pass's QMAX["fp8"] (trtkit/graph/scales.py)
# The DiT modules kept in high precision: the roots of trtkit/graph/patterns_dit.py DIT_EXCLUDE (embedders,
# final layer). Repeated here because runtime/ may not import graph/; tests/runtime/test_fp8.py checks they agree.
HIGH_PRECISION_ROOTS = ("x_embedder", "pos_embed", "context_embedder", "time_text_embed", "norm_out", "proj_out")
# adaLN modulation linears read the [B, D] conditioning vector; every other block linear reads [B, S, D]
# tokens. torchao wants the static scale with the input's rank, so each layer's rank is fixed up front.
ADALN_LEAVES = ("norm1.linear", "norm1_context.linear", "norm.linear")
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
ATTENTION_INPUTS = ("q_bmm", "k_bmm", "v_bmm", "softmax")  # as trtkit/calibfile.py names them


@dataclass(frozen=True)
class Fp8Layer:
    name: str
    amax: float
    scale: float  # amax / 448: what the Q/DQ ONNX writes for this input
    input_ndim: int


def excluded(name: str) -> str | None:
    for root in HIGH_PRECISION_ROOTS:
        if name == root or name.startswith(root + "."):
            return f"kept high precision ({root}, as the Q/DQ pass's DiT exclusions)"
    return None


def input_ndim(name: str) -> int:
    return 2 if name.endswith(ADALN_LEAVES) else 3


def amax_from_calibration(path: Path | str) -> dict[str, float]:
    """{linear module: input amax} of a trtkit calibration file. Attention BMM ranges are left out: torchao
    has no static-scale FP8 attention, so attention stays BF16 (SDPA) in the torch path."""
    from trtkit import calibfile

    cal = calibfile.load(path)
    if cal.smooth:
        raise TrtkitError(f"{path} carries SmoothQuant vectors (an INT8 recipe); the torch FP8 path takes plain "
                          "ranges: calibrate with --fp8")
    return {k: v for k, v in cal.activations.items() if k.rsplit(".", 1)[-1] not in ATTENTION_INPUTS}


def plan_fp8(transformer: Any, amax: Mapping[str, float], exclude: Iterable[str] = ()) -> tuple[
        dict[str, Fp8Layer], dict[str, str]]:
    """({module: Fp8Layer} to quantize, {module: why not}) for the ranges `amax` on `transformer`."""
    import math

    import torch

    modules = dict(transformer.named_modules())
    unknown = sorted(k for k in amax if k not in modules)
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise TrtkitError(f"the FP8 ranges name module {unknown[0]!r}{more}, which the "
                          f"{type(transformer).__name__} does not have; were they calibrated for another model?")
    skip = tuple(exclude)
    layers: dict[str, Fp8Layer] = {}
    why_not: dict[str, str] = {}
    for name, a in sorted(amax.items()):
        m = modules[name]
        why = excluded(name)
        if why is None and any(p and p in name for p in skip):
            why = "excluded by the caller"
        if why is None and not isinstance(m, torch.nn.Linear):
            why = f"a {type(m).__name__}, not a Linear"
        if why is None and (m.in_features % 16 or m.out_features % 16):  # torch._scaled_mm's constraint
            why = f"{m.in_features}x{m.out_features}: FP8 GEMMs need both sizes multiples of 16"
        if why is None and not (math.isfinite(a) and a > 0):
            why = f"no usable range (amax {a})"
        if why is not None:
            why_not[name] = why
            continue
        layers[name] = Fp8Layer(name, float(a), float(a) / FP8_MAX, input_ndim(name))
    return layers, why_not


def quantize_fp8(transformer: Any, scales: Mapping[str, float] | Path | str, exclude: Iterable[str] = (),
                 inductor_config: bool = False) -> dict[str, float]:
    """Swap each calibrated nn.Linear of `transformer` to torchao FP8 (E4M3 weights per tensor, static
    per-tensor activation scale amax/448). `scales`: {module: activation amax} or a calibration file.
    Returns {module: activation scale} as applied.

    inductor_config False leaves torchao's recommended inductor settings off: they turn on coordinate-descent
    tuning, which multiplies the compile time of `regional_compile`."""
    import torch

    try:
        from torchao.quantization import Float8StaticActivationFloat8WeightConfig as Static
        from torchao.quantization import FqnToConfig, PerTensor, quantize_
    except ImportError as e:
        raise TrtkitError(f"FP8 in torch needs torchao 0.18 or newer (pip install 'trtkit[fp8]'): {e}") from e
    amax = amax_from_calibration(scales) if isinstance(scales, (str, Path)) else dict(scales)
    layers, _ = plan_fp8(transformer, amax, exclude)
    if not layers:
        raise TrtkitError("no linear layer of the transformer has an FP8 range to apply")
    modules = dict(transformer.named_modules())
    configs: dict[str, Any] = {}
    for name, lay in layers.items():
        dev = modules[name].weight.device
        act = torch.full((1,) * lay.input_ndim, lay.scale, dtype=torch.float32, device=dev)
        configs[name] = Static(act_quant_scale=act, granularity=PerTensor(), set_inductor_config=inductor_config)
    quantize_(transformer, FqnToConfig(fqn_to_config=configs), filter_fn=None)
    return {name: lay.scale for name, lay in layers.items()}


def applied_scales(transformer: Any) -> dict[str, float]:
    """{module: the static activation scale its FP8 weight carries}: what the GEMMs really use."""
    out: dict[str, float] = {}
    for name, m in transformer.named_modules():
        s = getattr(getattr(m, "weight", None), "act_quant_scale", None)
        if s is not None:
            out[name] = float(s.reshape(-1)[0])
    return out


def regional_compile(transformer: Any, **compile_kwargs: Any) -> str:
    """Compile the repeated blocks of `transformer` once per block class, in place; returns how.

    diffusers' `compile_repeated_blocks` where the class lists its `_repeated_blocks` (FLUX), else
    `torch.compile` of every block of the block lists (SD3 in diffusers 0.42 lists none). dynamic=False:
    a benchmark runs one shape."""
    kwargs = {"dynamic": False, **compile_kwargs}
    if getattr(transformer, "_repeated_blocks", None) and hasattr(transformer, "compile_repeated_blocks"):
        transformer.compile_repeated_blocks(**kwargs)
        return "compile_repeated_blocks"
    n = 0
    for attr in BLOCK_LISTS:
        for block in getattr(transformer, attr, None) or ():
            block.compile(**kwargs)
            n += 1
    if n == 0:
        raise TrtkitError(f"{type(transformer).__name__} has no repeated blocks to compile "
                          f"(looked for {', '.join(BLOCK_LISTS)})")
    return f"torch.compile of {n} blocks"
