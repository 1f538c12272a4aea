"""Pattern finders on the real tiny-UNet export and on hand-built graphs."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from tests.graph.conftest import attention_model, plain_model
from trtkit.graph import patterns


def _find(model: onnx.ModelProto) -> patterns.Matches:
    meta = {p.key: p.value for p in model.metadata_props}
    return patterns.find(gs.import_onnx(model), patterns.scope_of(meta))


def test_tiny_unet_matches(tiny_unet_onnx: Path) -> None:
    m = _find(onnx.load(str(tiny_unet_onnx)))
    # tiny SDXL layout: 4 Gemm embeddings + 12 time_emb_proj + 132 transformer/proj linears
    assert (len(m.linear), len(m.conv), len(m.attention)) == (148, 35, 24)
    assert m.scoped and not m.notes
    names = {x.module: x for x in m.linear}
    q = names["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert (q.op, q.axis, q.in_axis) == ("MatMul", 1, 0)  # [in, out] weight: output channels on axis 1
    assert q.weight.startswith("onnx::MatMul_")  # anonymous initializer: the name came from the node scope
    gemm = names["time_embedding.linear_1"]
    assert (gemm.op, gemm.axis, gemm.in_axis) == ("Gemm", 0, 1)  # transB weight [out, in]
    assert names["down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"].bias is not None
    conv = {x.module: x for x in m.conv}["down_blocks.0.resnets.0.conv1"]
    assert (conv.axis, conv.in_axis) == (0, 1)
    attn = {a.module: a for a in m.attention}
    a1 = attn["down_blocks.1.attentions.0.transformer_blocks.0.attn1"]
    assert a1.head_size == 16 and a1.q_prescale and a1.k_prescale  # SDPA export: q and k pre-scaled
    assert "mid_block.attentions.0.transformer_blocks.0.attn2" in attn
    assert {a.module.rsplit(".", 1)[1] for a in m.attention} == {"attn1", "attn2"}


def test_unscoped_graph_falls_back_to_initializer_names(tiny_unet_onnx: Path) -> None:
    model = onnx.load(str(tiny_unet_onnx))
    for i, n in enumerate(model.graph.node):
        n.name = f"{n.op_type}_{i}"
    del model.metadata_props[:]
    m = _find(model)
    assert (len(m.linear), len(m.conv), len(m.attention)) == (148, 35, 24)
    assert not m.scoped and m.notes
    convs = {x.module for x in m.conv}
    assert "down_blocks.0.resnets.0.conv1" in convs and "conv_in" in convs  # from unet.<name>.weight
    gemms = {x.module for x in m.linear if x.op == "Gemm"}
    assert "time_embedding.linear_1" in gemms
    # anonymous MatMul weights: the node name is all that is left, said honestly rather than guessed
    assert any(x.module.startswith("MatMul_") for x in m.linear)


def test_hand_built_attention_and_nothing() -> None:
    m = _find(attention_model(head=8))
    assert len(m.attention) == 1 and m.attention[0].head_size == 8
    assert m.attention[0].module == "blocks.0.attn1"
    assert {x.module for x in m.linear} == {"blocks.0.attn1.to_q", "blocks.0.attn1.to_k", "blocks.0.attn1.to_v",
                                            "blocks.0.attn1.to_out.0"}
    assert _find(plain_model()).empty


def test_fused_qkv_export(tiny_model_dir: Path, tmp_path: Path) -> None:
    """diffusers' fuse_qkv_projections(): one to_qkv (self) / to_kv (cross) MatMul, attention still found."""
    import warnings

    import torch

    from trtkit.exporter import _wrapper, example_inputs, load_component, resolve_shapes
    from trtkit.graph.qdq import QuantizeConfig, quantize

    unet = load_component(tiny_model_dir, "unet")
    unet.fuse_qkv_projections()
    wrapper, _ = _wrapper("unet", unet, True)
    shapes = resolve_shapes(tiny_model_dir, "unet", "tiny-256")
    feeds = example_inputs(shapes)
    path = tmp_path / "fused.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(torch.from_numpy(v) for v in feeds.values()), str(path), dynamo=False,
                          opset_version=19, input_names=list(shapes), output_names=["noise_pred"])
    model = onnx.load(str(path))
    e = model.metadata_props.add()
    e.key, e.value = "trtkit.scope", "/unet/"
    onnx.save(onnx.shape_inference.infer_shapes(model), str(path))
    m = _find(onnx.load(str(path)))
    leaves = {x.module.rsplit(".", 1)[1] for x in m.linear}
    assert {"to_qkv", "to_kv", "to_q"} <= leaves and "to_k" not in leaves
    assert len(m.attention) == 24 and {a.head_size for a in m.attention} == {16}
    r = quantize(QuantizeConfig(onnx_path=path, output=tmp_path / "q.onnx", precision="fp8", level=2.5))
    fused = [d for d in r.decisions if d.module.endswith(("to_qkv", "to_kv"))]
    assert fused and all(d.quantized and "q/k/v projection" in d.reason for d in fused)
