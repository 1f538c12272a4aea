"""The full-TensorRT paths (10.x: precision flags + explicit Q/DQ, timing cache; 11.x: strongly typed),
and the engine inspector JSON where a plan can be deserialized. They run wherever full TensorRT and
a GPU exist (the `tensorrt` marker skips them elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builder_models import LINEAR_SHAPES, make_linear

from trtkit.builder.build import build
from trtkit.builder.config import BuildConfig
from trtkit.builder.network import network_flags
from trtkit.errors import TrtkitError

pytestmark = pytest.mark.tensorrt

SMALL = "sample:2x4x16x16,timestep:1,encoder_hidden_states:2x77x64,text_embeds:2x32,time_ids:2x6"


@pytest.fixture(scope="module")
def backend():  # type: ignore[no-untyped-def]
    from trtkit.backend import load_backend

    return load_backend("trt")


def deserialize(backend, plan: Path):  # type: ignore[no-untyped-def]
    runtime = backend.trt.Runtime(backend.logger)
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    assert engine is not None
    return engine


def check_layers(doc: dict, plan: Path) -> None:
    """The saved layer JSON exists, is DETAILED, and is resolved at profile 0's opt shapes (review finding 9):
    no -1 dimension left, and every conv/matmul has FLOPs, as in a live `trtkit inspect`."""
    from trtkit.inspector.layers import parse_engine_information

    opt = {n: r["opt"] for n, r in doc["profiles"][0]["shapes"].items()}
    assert doc["layers"] == {"saved": True, "path": plan.with_suffix(".layers.json").name,
                             "reason": "engine inspector JSON (DETAILED)", "shapes": opt}
    text = plan.with_suffix(".layers.json").read_text()
    layers = json.loads(text)["Layers"]
    assert layers and isinstance(layers[0], dict)  # DETAILED: objects, not bare names
    info = parse_engine_information(text)
    assert all(d > 0 for x in info.layers for t in (*x.inputs, *x.outputs) for d in (t.dims or ())), "unresolved -1"
    compute = [x for x in info.layers if x.kind in ("conv", "matmul")]
    assert all(x.flops() for x in compute), [x.name for x in compute if not x.flops()]


def test_network_flags(backend) -> None:  # type: ignore[no-untyped-def]
    ndf = backend.trt.NetworkDefinitionCreationFlag
    if backend.major >= 11:
        assert network_flags(backend, True) == 0  # always strongly typed; the flag is deprecated
    else:
        assert network_flags(backend, True) == 1 << int(ndf.STRONGLY_TYPED)
        assert network_flags(backend, False) == 0


def test_fp16_with_timing_cache(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if backend.major >= 11:
        pytest.importorskip("trtkit.graph.fp16")
    onnx = make_linear(tmp_path / "m.onnx")
    cache = tmp_path / "timing.cache"
    base = dict(onnx=onnx, output=tmp_path / "e.plan", shapes=LINEAR_SHAPES, precision="fp16", backend="trt",
                timing_cache=cache, workspace="1G", progress=False)
    r = build(BuildConfig(**base))
    doc = json.loads(r.metadata.read_text())
    if backend.major >= 11:
        assert doc["precision"]["strongly_typed"] and doc["precision"]["builder_flags"] == []
        assert any("FP16 graph conversion" in n for n in doc["notes"])
    else:
        assert not doc["precision"]["strongly_typed"] and doc["precision"]["builder_flags"] == ["FP16"]
    cc = backend.compute_capability
    assert doc["target"] == {"gpu": backend.gpu, "compute_capability": f"{cc[0]}.{cc[1]}"}
    assert doc["settings"]["timing_cache"] == str(cache) and cache.stat().st_size > 0
    assert doc["settings"]["workspace"] == 1 << 30
    check_layers(doc, r.plan)
    engine = deserialize(backend, r.plan)
    assert engine.num_optimization_profiles == 1
    size = cache.stat().st_size
    r2 = build(BuildConfig(**base, force=True))  # reloads the cache it wrote
    assert not any("starting a new one" in n for n in r2.notes) and cache.stat().st_size >= size


@pytest.mark.parametrize("qdq", ["int8", "fp8"])
def test_prequantized_flags(backend, qdq: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cc = backend.compute_capability
    if qdq == "fp8" and cc < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9")
    r = build(BuildConfig(onnx=make_linear(tmp_path / "m.onnx", qdq), output=tmp_path / "e.plan",
                          shapes=LINEAR_SHAPES, precision=qdq, backend="trt", progress=False))
    doc = json.loads(r.metadata.read_text())
    assert doc["precision"]["builder_flags"] == ([] if backend.major >= 11 else [qdq.upper()])
    assert doc["settings"]["opt_level"] == 4
    check_layers(doc, r.plan)


def test_tiny_unet_two_profiles(backend, tiny_unet_onnx: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if backend.major >= 11:
        pytest.importorskip("trtkit.graph.fp16")
    r = build(BuildConfig(onnx=tiny_unet_onnx, output=tmp_path / "unet.plan", profiles=("tiny-256", SMALL),
                          precision="fp16", backend="trt", progress=False))
    engine = deserialize(backend, r.plan)
    assert engine.num_optimization_profiles == 2
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    assert names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "noise_pred"]
    check_layers(json.loads(r.metadata.read_text()), r.plan)


def test_target_cc_is_rtx_only(tmp_path: Path) -> None:
    with pytest.raises(TrtkitError, match="--target-cc is for TensorRT-RTX"):
        build(BuildConfig(onnx=make_linear(tmp_path / "m.onnx"), output=tmp_path / "e.plan", shapes=LINEAR_SHAPES,
                          backend="trt", target_cc=("8.9",)))
    assert not (tmp_path / "e.plan").exists()


@pytest.mark.rtx
@pytest.mark.gpu
def test_rtx_on_its_gpu_saves_layers(tmp_path: Path) -> None:
    from trtkit.backend import load_backend

    be = load_backend("rtx")
    if not be.can_run:
        pytest.skip(be.why_not_run)
    r = build(BuildConfig(onnx=make_linear(tmp_path / "m.onnx", "int8"), output=tmp_path / "e.plan",
                          shapes=LINEAR_SHAPES, precision="int8", backend="rtx", target_cc=("current",), progress=False))
    check_layers(json.loads(r.metadata.read_text()), r.plan)
