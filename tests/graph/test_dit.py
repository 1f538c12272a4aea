"""The Q/DQ pass on the tiny FLUX.1-dev and SD3.5-medium transformers (trtkit/graph/patterns_dit.py):
matches named after their diffusers modules, the DiT levels and exclusions with reasons, FP8 attention by
head size, coverage per block kind, and the Q/DQ graph against the FP32 export in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from trtkit.exporter import run_onnxruntime
from trtkit.graph.coverage import coverage
from trtkit.graph.qdq import QuantizeConfig, quantize

# Output error bound vs the FP32 export, max|out - ref| / max|ref|, on unseen seeded inputs (seed 1; the
# pass calibrates on seed 0), max calibration, rest FP16. Measured (tiny random-weight models):
# FLUX FP8 L4 0.011, INT8 L3 0.0085; SD3 FP8 L4 0.0044, INT8 L3 0.0015.
BOUND = 0.03


@pytest.fixture(scope="module")
def dit_quantized(tiny_dit_onnx, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("dit-q")
    cache: dict[tuple, object] = {}

    def get(family: str, precision: str, level: float):
        key = (family, precision, level)
        if key not in cache:
            cache[key] = quantize(QuantizeConfig(onnx_path=tiny_dit_onnx(family), precision=precision, level=level,
                                                 output=root / f"{family}.{precision}.l{level:g}.onnx"))
        return cache[key]

    return get


def test_flux_fp8_decisions(dit_quantized) -> None:
    r = dit_quantized("flux", "fp8", 4.0)
    d = {x.module: x for x in r.decisions}
    # joint block: adaLN modulation, image and text q/k/v, both outputs, both MLPs
    for leaf in ("norm1.linear", "norm1_context.linear", "attn.to_q", "attn.add_k_proj", "attn.to_out.0",
                 "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.2"):
        assert d[f"transformer_blocks.0.{leaf}"].quantized and d[f"transformer_blocks.0.{leaf}"].type == "fp8", leaf
    # single-stream block: its own proj_out is the attention+MLP output, not the final layer
    for leaf in ("norm.linear", "attn.to_v", "proj_mlp", "proj_out"):
        assert d[f"single_transformer_blocks.1.{leaf}"].quantized, leaf
    assert d["single_transformer_blocks.0.proj_mlp"].reason == "MLP linear (level >= 2)"
    assert d["transformer_blocks.0.norm1.linear"].reason == "adaLN modulation linear (level >= 3)"
    for mod, root in (("x_embedder", "x_embedder"), ("context_embedder", "context_embedder"),
                      ("time_text_embed.guidance_embedder.linear_1", "time_text_embed"),
                      ("norm_out.linear", "norm_out"), ("proj_out", "proj_out")):
        assert not d[mod].quantized and d[mod].reason.startswith(f"default exclusion ({root}): "), mod
    # FP8 attention: the head size (16 here, 128 in FLUX.1) comes from the config where RoPE hides it
    attn = [x for x in r.decisions if x.kind == "attention"]
    assert [a.module for a in attn] == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn",
                                        "single_transformer_blocks.1.attn"]
    assert all(a.quantized and a.reason == "attention BMMs and softmax (head size 16)" for a in attn)
    assert r.counts == {"linear": {"quantized": 26, "total": 36}, "conv": {"quantized": 0, "total": 0},
                        "attention": {"quantized": 3, "total": 3}}


def test_levels_and_sd3(dit_quantized) -> None:
    r2 = dit_quantized("flux", "int8", 2.0)
    q2 = {x.module for x in r2.decisions if x.quantized}
    assert q2 == {m for m in q2 if m.endswith(("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                                 "ff_context.net.2", "proj_mlp"))} and len(q2) == 6
    sd3 = dit_quantized("sd3", "fp8", 4.0)
    d = {x.module: x for x in sd3.decisions}
    assert d["transformer_blocks.0.attn2.to_q"].quantized  # SD3.5's dual attention
    assert d["transformer_blocks.0.attn2"].quantized and d["transformer_blocks.1.attn"].quantized
    assert not d["pos_embed.proj"].quantized and "embedder" in d["pos_embed.proj"].reason  # a conv
    assert sd3.counts["linear"] == {"quantized": 29, "total": 36}


def test_coverage_per_block_kind(dit_quantized) -> None:
    rep = coverage(dit_quantized("flux", "fp8", 4.0).path)
    assert rep.blocks() == ["embedders", "joint blocks", "single blocks", "final layer"]
    by = rep.by_block()
    assert by["joint blocks"]["linear"]["quantized"] == by["joint blocks"]["linear"]["total"] == 14
    assert by["single blocks"]["attention"]["quantized"] == 2
    assert by["embedders"]["linear"]["quantized"] == 0 and by["embedders"]["linear"]["total"] == 8


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize(("precision", "level"), [("fp8", 4.0), ("int8", 3.0)])
def test_qdq_graph_matches_fp32(family: str, precision: str, level: float, dit_quantized, tiny_dit_onnx) -> None:
    from trtkit.graph.ranges import sample_feeds

    src: Path = tiny_dit_onnx(family)
    feeds = sample_feeds(onnx.load(str(src)), "tiny-256", seed=1)
    ref = run_onnxruntime(src, feeds)[0]
    got = run_onnxruntime(dit_quantized(family, precision, level).path, feeds)[0]
    err = float(np.max(np.abs(got.astype(np.float32) - ref)) / np.max(np.abs(ref)))
    print(f"\n{family} {precision} level {level:g}: output error vs FP32 {err:.4f}")
    assert 0 < err < BOUND
