"""The DiT side of the exporter: loading FLUX.1 / SD3.x transformers and T5 encoders, their export
wrappers (inputs positional, in the profile's order), output names and dynamic axes.

The exporter (trtkit/exporter.py) calls in here for `-c transformer`, `-c text_encoder_3` and any text
encoder folder holding a T5 (FLUX's text_encoder_2), so the family knowledge stays in this module and in
trtkit/profiles_dit.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trtkit._quiet import quiet_loading
from trtkit.errors import TrtkitError
from trtkit.profiles import InputShapes
from trtkit.profiles_dit import TRANSFORMER_CLASSES

OUTPUT_NAMES = {"transformer": ["noise_pred"], "t5": ["last_hidden_state"]}
_CAST_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections")


def load(model_dir: Path | str, component: str, t5: bool, dtype: Any = None) -> Any:
    """The transformer (FluxTransformer2DModel / SD3Transformer2DModel) or a T5 encoder of a pipeline folder."""
    import torch

    root = Path(model_dir)
    sub = component
    if not (root / sub).is_dir() and component == "transformer" and (root / "config.json").is_file():
        sub = ""  # a lone transformer folder
    elif not (root / sub).is_dir():
        raise TrtkitError(f"{root} has no {sub}/ folder: is it a FLUX or SD3 pipeline folder?")
    kw: dict[str, Any] = {"subfolder": sub} if sub else {}
    try:
        with quiet_loading():
            if t5:
                from transformers import T5EncoderModel

                return T5EncoderModel.from_pretrained(str(model_dir), torch_dtype=dtype or torch.float32, **kw).eval()
            import diffusers

            name = _class_name((root / sub if sub else root) / "config.json")
            if name not in TRANSFORMER_CLASSES:
                raise TrtkitError(f"{component} of {model_dir} is a {name}; trtkit exports "
                                  f"{' and '.join(TRANSFORMER_CLASSES)}")
            cls = getattr(diffusers, name)
            return cls.from_pretrained(str(model_dir), torch_dtype=dtype or torch.float32, **kw).eval()
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrtkitError(f"cannot load {component} from {model_dir}: {first}") from e


def _class_name(config: Path) -> str:
    import json

    return str(json.loads(config.read_text())["_class_name"])


@contextlib.contextmanager
def float32_rope(module: Any) -> Iterator[None]:
    """FLUX computes its RoPE tables in float64 off MPS; TensorRT has no float64 layers, so the export
    traces them in float32 (positions are small integers: the angle error is < 1e-5 rad at 1536 px), as
    diffusers already does on MPS."""
    import diffusers.models.transformers.transformer_flux as tf
    import torch

    pos = getattr(module, "pos_embed", None)
    if pos is None or not hasattr(tf, "maybe_adjust_dtype_for_device"):
        yield
        return
    orig = tf.maybe_adjust_dtype_for_device

    def f32(dtype: Any, device: Any) -> Any:
        return torch.float32 if dtype == torch.float64 else orig(dtype, device)

    def rope(x: Any, freqs_cis: Any, use_real: bool = True, use_real_unbind_dim: int = -1,
             sequence_dim: int = 2) -> Any:
        # diffusers' apply_rotary_emb (real, interleaved pairs) without reading x's shape: the tracer
        # records that shape of the concatenated text+image sequence as constants
        cos, sin = freqs_cis
        cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if sequence_dim == 1 else (cos[None, None], sin[None, None])
        x_rot = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
        return (x.float() * cos + x_rot.float() * sin).to(x.dtype)

    orig_rope = tf.apply_rotary_emb
    tf.maybe_adjust_dtype_for_device = f32
    tf.apply_rotary_emb = rope
    try:
        yield
    finally:
        tf.maybe_adjust_dtype_for_device = orig
        tf.apply_rotary_emb = orig_rope


@contextlib.contextmanager
def traceable_rms_norm() -> Iterator[None]:
    """torch.nn.RMSNorm (FLUX's q/k norms) traces to aten::rms_norm, which the TorchScript exporter maps only
    from opset 23 (RMSNormalization); a custom symbolic loses the output shape, and the exporter then bakes
    the traced sequence length into the following Reshapes. So while exporting, the module runs the same
    arithmetic in plain ops, as diffusers' own RMSNorm does: x * rsqrt(mean(x^2) + eps) * weight."""
    import torch

    orig = torch.nn.RMSNorm.forward

    def forward(self: Any, x: Any) -> Any:
        dims = tuple(range(-len(self.normalized_shape), 0))
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        return y * self.weight if self.weight is not None else y

    torch.nn.RMSNorm.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.RMSNorm.forward = orig  # type: ignore[method-assign]


def fold_weight_transposes(model: Any, base_dir: Path | None = None) -> int:
    """Transpose(initializer) -> the transposed initializer, in place; returns how many.

    DiT transformers are exported without the exporter's constant folding: it folds `Shape` of the
    concatenated text+image sequence (a sum of two dynamic axes, which ONNX shape inference cannot name)
    to the traced length, so the graph would only run at the export's token counts. Without it, nn.Linear
    exports as MatMul(x, Transpose(W)); folding just those keeps the weights constant for the Q/DQ pass
    (TensorRT folds whatever else is constant at build time)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    files: dict[str, int] = {}  # external data file -> how many initializers it holds
    for t in inits.values():
        if t.data_location == onnx.TensorProto.EXTERNAL:
            files[_location(t)] = files.get(_location(t), 0) + 1
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    done = []
    for n in model.graph.node:
        if n.op_type != "Transpose" or n.input[0] not in inits or readers.get(n.input[0]) != 1:
            continue
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        src = inits[n.input[0]]
        if base_dir is not None and src.data_location == onnx.TensorProto.EXTERNAL:
            t = _transposed_file(src, perm, n.output[0], base_dir, own_file=files[_location(src)] == 1)
        else:
            w = numpy_helper.to_array(src)
            t = numpy_helper.from_array(np.ascontiguousarray(np.transpose(w, perm)), n.output[0])
        model.graph.initializer.remove(inits.pop(n.input[0]))
        model.graph.initializer.append(t)
        done.append(n)
    for n in done:
        model.graph.node.remove(n)
    return len(done)


def inline_attribute_tensors(model: Any, base_dir: Path) -> int:
    """Constant nodes' tensors that torch wrote to files of their own (past 2 GB it writes every tensor out)
    back into the graph: they are small, and only initializers are streamed to the output's data file."""
    import onnx
    from onnx.external_data_helper import _get_attribute_tensors, load_external_data_for_tensor

    n = 0
    for t in _get_attribute_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(t, str(base_dir))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
            n += 1
    return n


def _location(t: Any) -> str:
    return next((e.value for e in t.external_data if e.key == "location"), "")


def _transposed_file(src: Any, perm: list[int] | None, name: str, base_dir: Path, own_file: bool) -> Any:
    """An external weight transposed into a file of its own beside it, returned as an external stub: a
    model whose weights stayed on disk (`base_dir`) is folded one weight in memory at a time. The source's
    file goes when it held only this weight (torch writes one file per tensor), so the disk holds each
    weight once."""
    import uuid

    import numpy as np
    import onnx

    from trtkit.graph.external import Streamer, _set_ext

    w = np.ascontiguousarray(np.transpose(Streamer(base_dir).read(src).reshape(list(src.dims)), perm))
    file = f"trtkit_T_{uuid.uuid4().hex}.bin"
    w.tofile(base_dir / file)
    if own_file:
        (base_dir / _location(src)).unlink(missing_ok=True)
    stub = onnx.TensorProto(name=name, data_type=src.data_type, dims=list(w.shape))
    _set_ext(stub, file, 0, w.nbytes)
    return stub


def wrapper(module: Any, t5: bool, shapes: InputShapes) -> tuple[Any, str]:
    """An nn.Module taking the profile's inputs positionally; the child attribute name becomes the
    node-name scope (`/transformer/transformer_blocks.0/attn/to_q/MatMul`)."""
    import torch

    names = list(shapes)
    dtype = next(module.parameters()).dtype
    low = dtype if dtype in (torch.float16, torch.bfloat16) else None

    class TransformerWrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = module

        def forward(self, *args: Any) -> Any:
            if low is None:
                return self.transformer(**dict(zip(names, args, strict=True)), return_dict=False)[0]
            # 16-bit weights (ExportConfig.dtype): the ONNX keeps FP32 inputs and output, cast at the edges;
            # timestep, guidance and the RoPE ids stay FP32 (diffusers casts the first two itself)
            kw = {n: a.to(low) if n in _CAST_INPUTS else a for n, a in zip(names, args, strict=True)}
            return self.transformer(**kw, return_dict=False)[0].float()

    class T5Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text_encoder = module

        def forward(self, input_ids: Any) -> Any:
            return self.text_encoder(input_ids.to(torch.int64)).last_hidden_state

    if t5:
        return T5Wrap(), "text_encoder"
    return TransformerWrap(), "transformer"


def dynamic_axes(shapes: InputShapes, outputs: list[str], t5: bool) -> dict[str, dict[int, str]]:
    """Batch, token and spatial axes dynamic, so one file serves several profiles."""
    axes: dict[str, dict[int, str]] = {}
    for name, r in shapes.items():
        if name == "input_ids":
            axes[name] = {0: "batch", 1: "tokens"}
        elif name in ("timestep", "guidance", "pooled_projections"):
            axes[name] = {0: "batch"}
        elif name == "encoder_hidden_states":
            axes[name] = {0: "batch", 1: "tokens"}
        elif name == "img_ids":
            axes[name] = {0: "image_tokens"}
        elif name == "txt_ids":
            axes[name] = {0: "tokens"}
        elif name == "hidden_states":
            axes[name] = {0: "batch", 1: "image_tokens"} if len(r.opt) == 3 else {0: "batch", 2: "height", 3: "width"}
    for o in outputs:
        if t5:
            axes[o] = {0: "batch", 1: "tokens"}
        else:
            axes[o] = dict(axes["hidden_states"])
    return axes
