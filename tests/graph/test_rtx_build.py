"""Every graph the pass emits (each level, INT8 and FP8) parses and builds with TensorRT-RTX on the CPU
(ahead of time for SM 8.9, which has FP8), and the builder says nothing about Q/DQ it could not use."""

from __future__ import annotations

import logging
import re

import pytest

from tests.graph.test_qdq import EXPECTED

# Warnings that are not about Q/DQ placement: RTX's compiler stores conv Q/DQ scales in FP32 when the
# graph gives them in FP16 (the scale type must equal the FP16 activation type in ONNX), and says so.
ACCEPTED = (re.compile(r"Converting conv (weight|activation) scales to fp32"),)
# What a misplaced Q/DQ looks like in TensorRT logs: dangling/unfused Q or DQ, unsupported placement.
QDQ_TROUBLE = re.compile(r"(Quantiz|Dequantiz|Q/DQ|QDQ|[^a-z]scale)", re.IGNORECASE)


UNET_OPT = {"sample": (2, 4, 32, 32), "timestep": (1,), "encoder_hidden_states": (2, 77, 64), "text_embeds": (2, 32),
            "time_ids": (2, 6)}


def build(path, opt: dict[str, tuple[int, ...]] | None = None) -> tuple[bool, list[str], list[str]]:
    from trtkit.backend import load_backend

    b = load_backend("rtx")
    trt = b.trt
    b.logger.messages.clear()
    builder = trt.Builder(b.logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    net = builder.create_network(flags)
    parser = trt.OnnxParser(net, b.logger)
    if not parser.parse_from_file(str(path)):
        return False, [parser.get_error(i).desc() for i in range(parser.num_errors)], []
    cfg = builder.create_builder_config()
    cfg.num_compute_capabilities = 1
    cfg.set_compute_capability(trt.ComputeCapability.SM89, 0)
    cfg.builder_optimization_level = 0  # CI time; Q/DQ placement is judged before tactic selection
    prof = builder.create_optimization_profile()
    opt = opt or UNET_OPT
    for i in range(net.num_inputs):
        t = net.get_input(i)
        prof.set_shape(t.name, opt[t.name], opt[t.name], opt[t.name])
    cfg.add_optimization_profile(prof)
    plan = builder.build_serialized_network(net, cfg)
    msgs = [(lv, m) for lv, m in b.logger.messages]
    warnings = [m for lv, m in msgs if lv >= logging.WARNING]
    return plan is not None, [m for lv, m in msgs if lv >= logging.ERROR], warnings


@pytest.mark.rtx
@pytest.mark.parametrize("precision,level", sorted(EXPECTED) + [("int8", "3-fp32")])
def test_emitted_graph_builds_with_rtx(precision: str, level, quantized_cache) -> None:
    fp16 = level != "3-fp32"
    r = quantized_cache(precision, 3.0 if not fp16 else level, fp16)
    ok, errors, warnings = build(r.path)
    assert ok, errors
    left = [w for w in warnings if not any(a.search(w) for a in ACCEPTED)]
    assert not [w for w in left if QDQ_TROUBLE.search(w)], left
    assert not left, left


@pytest.mark.rtx
def test_int8_attention_builds_with_rtx(tmp_path, tiny_unet_onnx) -> None:
    """INT8 attention is opt-in (`--attention`); it builds too."""
    from trtkit.graph.qdq import QuantizeConfig, quantize

    r = quantize(QuantizeConfig(onnx_path=tiny_unet_onnx, output=tmp_path / "a.onnx", precision="int8",
                                quantize_attention=True))
    assert r.counts["attention"]["quantized"] == 24
    ok, errors, warnings = build(r.path)
    assert ok, errors
    assert not [w for w in warnings if not any(a.search(w) for a in ACCEPTED)]


@pytest.mark.rtx
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dit_builds_with_rtx(family: str, tiny_dit_onnx, tmp_path) -> None:
    """The tiny FLUX and SD3 transformers build FP16, FP8 level 4 and INT8 level 3 with no warning (the q/k
    RMSNorms stay FP32: in FP16 TensorRT warns of Pow/Reduce overflow)."""
    import onnx

    from trtkit.graph.fp16 import convert_fp16
    from trtkit.graph.qdq import QuantizeConfig, quantize
    from trtkit.graph.ranges import sample_feeds

    src = tiny_dit_onnx(family)
    opt = {k: v.shape for k, v in sample_feeds(onnx.load(str(src)), "tiny-256", 0).items()}
    graphs = [convert_fp16(src, tmp_path / "fp16.onnx")]
    for precision, level in (("fp8", 4.0), ("int8", 3.0)):
        graphs.append(quantize(QuantizeConfig(onnx_path=src, output=tmp_path / f"{precision}.onnx",
                                              precision=precision, level=level)).path)
    for g in graphs:
        ok, errors, warnings = build(g, opt)
        assert ok, (g.name, errors)
        assert not [w for w in warnings if not any(a.search(w) for a in ACCEPTED)], (g.name, warnings)
