"""LoRA refit weights (graph/lora.py) on the exported tiny UNet: the ONNX with the computed weights, run by
onnxruntime, gives what the diffusers UNet with the same LoRA fused (torch) gives; diffusers and kohya key styles
give the same weights; keys that map to nothing are a one-line error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from trtkit.errors import TrtkitError
from trtkit.graph.lora import apply_weights, fused_weights, initializers_of, read_adapter
from trtkit.graph.patterns import find

pytest.importorskip("peft")

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1", "proj_in")


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> Any:
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    return p


@pytest.fixture(scope="module")
def lora_files(pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from diffusers import StableDiffusionXLPipeline

    from trtkit.tiny_lora import random_lora_state, save_diffusers, save_kohya

    state = random_lora_state(pipe.unet, seed=5, rank=4, targets=TARGETS)
    d = tmp_path_factory.mktemp("lora")
    a = save_diffusers(state, d, "a.safetensors", StableDiffusionXLPipeline, alpha=2, targets=TARGETS)
    k = save_kohya(state, d / "a_kohya.safetensors", alpha=2)
    return a, k


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Two images with CFG (batch 4), latents 32x24 (non-square), 77 tokens; seeded."""
    rng = np.random.default_rng(0)
    dims = {"sample": (4, 4, 32, 24), "timestep": (1,)}
    out = {}
    for i in model.graph.input:
        shape = dims.get(i.name) or tuple(4 if not d.dim_value else d.dim_value for d in i.type.tensor_type.shape.dim)
        if i.name == "encoder_hidden_states":
            shape = (4, 77, shape[2])
        out[i.name] = rng.standard_normal(shape).astype(np.float32)
    out["timestep"] = np.array([500.0], np.float32)
    return out


def _torch_unet(unet: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    f = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        return unet(f["sample"], f["timestep"][0], encoder_hidden_states=f["encoder_hidden_states"],
                    added_cond_kwargs={"text_embeds": f["text_embeds"], "time_ids": f["time_ids"]},
                    return_dict=False)[0].numpy()


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


def _err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_refit_weights_match_diffusers_fused(pipe: Any, lora_files: tuple[Path, Path], tiny_unet_onnx: Path) -> None:
    model = onnx.load(str(tiny_unet_onnx))
    matches = find(gs.import_onnx(model))
    feeds = _feeds(model)
    adapter = read_adapter(lora_files[0])
    assert adapter.style == "peft" and all(layer.alpha == 2 for layer in adapter.layers.values())
    base = initializers_of(model, base_dir=tiny_unet_onnx.parent)
    new = fused_weights(adapter, matches, base, scale=0.8)
    assert len(new) == len(adapter.layers)  # one initializer per layer: every layer mapped, none shared
    kohya = fused_weights(read_adapter(lora_files[1]), matches, base, scale=0.8)
    assert kohya.keys() == new.keys() and all(np.array_equal(kohya[k], new[k]) for k in new)

    before = _ort(model, feeds)
    apply_weights(model, new)
    got = _ort(model, feeds)

    pipe.load_lora_weights(str(lora_files[0]), adapter_name="a")
    try:
        pipe.fuse_lora(lora_scale=0.8)
        want = _torch_unet(pipe.unet, feeds)
    finally:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    base_err = _err(before, want)
    err = _err(got, want)
    print(f"refit ONNX vs diffusers fused: {err:.2e}; base ONNX vs diffusers fused: {base_err:.2e}")
    assert base_err > 1e-2, f"the LoRA changes the output by only {base_err:.2e}"
    assert err < 1e-4, f"refit ONNX vs diffusers fused: {err:.2e} (without the LoRA: {base_err:.2e})"


def test_unmappable_keys_fail_in_one_line(tmp_path: Path, tiny_unet_onnx: Path) -> None:
    from safetensors.numpy import save_file

    model = onnx.load(str(tiny_unet_onnx))
    matches = find(gs.import_onnx(model))
    base = initializers_of(model, base_dir=tiny_unet_onnx.parent)
    a, b = np.zeros((4, 8), np.float32), np.zeros((8, 4), np.float32)
    save_file({"unet.down_blocks.9.attn1.to_q.lora_A.weight": a, "unet.down_blocks.9.attn1.to_q.lora_B.weight": b},
              str(tmp_path / "x.safetensors"))
    with pytest.raises(TrtkitError, match="match no weight of the ONNX UNet") as e:
        fused_weights(read_adapter(tmp_path / "x.safetensors"), matches, base)
    assert "\n" not in str(e.value)
    save_file({"unet.foo.weight": a}, str(tmp_path / "y.safetensors"))
    with pytest.raises(TrtkitError, match="no LoRA style"):
        read_adapter(tmp_path / "y.safetensors")
    save_file({"text_encoder.x.lora_A.weight": a, "unet.conv_in.lora_A.weight": a}, str(tmp_path / "z.safetensors"))
    with pytest.raises(TrtkitError, match="text encoder"):
        read_adapter(tmp_path / "z.safetensors")
    assert read_adapter(tmp_path / "z.safetensors", text_encoder="skip").skipped == ["text_encoder.x.lora_A.weight"]


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_qdq_refit_as_close_as_fresh_calibration(precision: str, lora_files: tuple[Path, Path], tiny_unet_onnx: Path,
                                                 quantized_cache: Any, tmp_path: Path) -> None:
    """A quantized UNet refit with the LoRA (weights re-quantized per channel with new scales, activation scales
    as calibrated for the base model) against the fused-FP32 ONNX, next to the same fused-FP32 ONNX quantized
    afresh (calibrated on it): the refit one must be about as close (fake quantization, onnxruntime, FP32 rest)."""
    from trtkit.graph.lora import requantized_weights
    from trtkit.graph.qdq import QuantizeConfig, quantize

    fmodel = onnx.load(str(tiny_unet_onnx))
    fmatches = find(gs.import_onnx(fmodel))
    fbase = initializers_of(fmodel, base_dir=tiny_unet_onnx.parent)
    adapter = read_adapter(lora_files[1])  # kohya style
    feeds = _feeds(fmodel)
    apply_weights(fmodel, fused_weights(adapter, fmatches, fbase, scale=0.8))
    fused_path = tmp_path / "fused.onnx"
    onnx.save(fmodel, str(fused_path))
    want = _ort(fmodel, feeds)

    qpath = quantized_cache(precision, 3, fp16=False).path
    qmodel = onnx.load(str(qpath))
    qgraph = gs.import_onnx(qmodel)
    new = requantized_weights(adapter, qgraph, fmatches, fbase, scale=0.8)
    acts_before = {t.name: numpy_helper_array(t) for t in qmodel.graph.initializer if t.name not in new}
    apply_weights(qmodel, new)
    assert all(np.array_equal(numpy_helper_array(t), acts_before[t.name]) for t in qmodel.graph.initializer
               if t.name in acts_before)  # activation scales and everything untouched stay as they were
    refit = _err(_ort(qmodel, feeds), want)
    stale = _err(_ort(onnx.load(str(qpath)), feeds), want)  # the quantized base without the LoRA
    fresh_path = quantize(QuantizeConfig(onnx_path=fused_path, output=tmp_path / "fresh.onnx", precision=precision,
                                         level=3, fp16=False)).path
    fresh = _err(_ort(onnx.load(str(fresh_path)), feeds), want)
    print(f"{precision}: vs fused FP32: refit {refit:.3e}, freshly calibrated {fresh:.3e}, unrefit base {stale:.3e}")
    assert refit < stale, "the refit did not bring the LoRA in"
    assert refit < 1.5 * fresh + 1e-3, f"refit {refit:.3e} vs fresh calibration {fresh:.3e}"


def numpy_helper_array(t: onnx.TensorProto) -> np.ndarray:
    if t.data_type in (onnx.TensorProto.FLOAT8E4M3FN,):
        return np.frombuffer(t.raw_data, np.uint8)
    from onnx import numpy_helper

    return numpy_helper.to_array(t)


def test_smoothquant_qdq_is_refused() -> None:
    """A Q/DQ ONNX with SmoothQuant holds W*s: re-quantizing W+delta without s would be wrong, so it is refused
    (the Mul trtkit's quantize inserts on the activation is named `<prefix>/smooth_inv`)."""
    from trtkit.graph.lora import requantized_weights

    x = gs.Variable("x", np.float32, (1, 4))
    s = gs.Constant("q/smooth_inv", np.ones(4, np.float32))
    y = gs.Variable("y", np.float32, (1, 4))
    g = gs.Graph(nodes=[gs.Node("Mul", inputs=[x, s], outputs=[y])], inputs=[x], outputs=[y])
    with pytest.raises(TrtkitError, match="SmoothQuant"):
        requantized_weights(None, g, None, {}, 1.0)  # type: ignore[arg-type]
