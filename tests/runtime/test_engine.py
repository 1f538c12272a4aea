"""Engine loading, buffers, bindings and shape checks. The shape-check rules run on the CPU; everything
that needs a plan is marked `tensorrt` (the full TensorRT is not installable here) and builds its plan
from the tiny UNet's ONNX with the plain TensorRT builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trtkit.errors import TrtkitError
from trtkit.runtime.engine import EngineError, TensorInfo, check_shapes

TENSORS = {
    "sample": TensorInfo("sample", True, "float16", (-1, 4, -1, -1), (2, 4, 16, 16), (2, 4, 32, 32)),
    "timestep": TensorInfo("timestep", True, "float32", (1,), (1,), (1,)),
    "noise_pred": TensorInfo("noise_pred", False, "float16", (-1, 4, -1, -1)),
}


def test_shapes_inside_the_profile_pass() -> None:
    check_shapes(TENSORS, {"sample": (2, 4, 24, 32), "timestep": (1,)})


@pytest.mark.parametrize("shapes,match", [
    ({"sample": (2, 4, 40, 32), "timestep": (1,)}, r"sample: 2x4x40x32 is outside the engine's profile "
                                                   r"\(min 2x4x16x16, max 2x4x32x32\)"),
    ({"sample": (2, 4, 32), "timestep": (1,)}, "rank 3"),
    ({"sample": (2, 3, 32, 32), "timestep": (1,)}, "dimension 1 is fixed to 4"),
    ({"sample": (2, 4, 32, 32)}, "timestep not given"),
    ({"sample": (2, 4, 32, 32), "timestep": (1,), "latent": (1,)}, "has no input latent"),
])
def test_shape_errors_are_one_line(shapes: dict, match: str) -> None:
    with pytest.raises(EngineError, match=match) as e:
        check_shapes(TENSORS, shapes, "unet")
    assert isinstance(e.value, TrtkitError) and "\n" not in str(e.value)


def test_missing_plan_is_a_one_line_error(tmp_path: Path) -> None:
    from trtkit.runtime.engine import Engine

    with pytest.raises(TrtkitError, match="does not exist"):
        Engine.load(tmp_path / "unet.plan")


# ------------------------------------------------------------------------------------------------
# with a real TensorRT


def _build(onnx: Path, out: Path, tiny_model_dir: Path, version_compatible: bool = False,
           component: str = "unet") -> Path:
    from trtkit.backend import load_backend
    from trtkit.profiles import ModelDims, get_profile

    be = load_backend("trt")
    trt = be.trt
    builder = trt.Builder(be.logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if hasattr(
        trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") else 0
    net = builder.create_network(flags)
    parser = trt.OnnxParser(net, be.logger)
    assert parser.parse_from_file(str(onnx))
    cfg = builder.create_builder_config()
    prof = builder.create_optimization_profile()
    for name, r in get_profile("tiny-256").shapes(component, ModelDims.from_folder(tiny_model_dir)).items():
        prof.set_shape(name, r.min, r.opt, r.max)
    cfg.add_optimization_profile(prof)
    if version_compatible:
        cfg.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    plan = builder.build_serialized_network(net, cfg)
    out.write_bytes(bytes(plan))
    return out


@pytest.fixture(scope="module")
def unet_plan(tiny_unet_onnx: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tiny_unet_onnx, tmp_path_factory.mktemp("plan") / "unet.plan", tiny_model_dir)


@pytest.mark.tensorrt
def test_engine_matches_onnxruntime(unet_plan: Path, tiny_unet_onnx: Path) -> None:
    from trtkit.exporter import run_onnxruntime
    from trtkit.runtime.cuda import Stream
    from trtkit.runtime.engine import Engine

    e = Engine.load(unet_plan)
    assert set(e.inputs) >= {"sample", "timestep", "encoder_hidden_states"} and e.outputs == ["noise_pred"]
    bufs = e.allocate()  # once, at the profile's max
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(b.shape).astype(b.dtype) for n, b in bufs.items() if n in e.inputs}
    feeds["timestep"][:] = 500
    s = Stream()
    for n, v in feeds.items():
        bufs[n].upload(v, s.handle)
    e.bind(bufs)
    e.execute(s.handle)
    got = bufs["noise_pred"].download(s.handle)
    want = run_onnxruntime(tiny_unet_onnx, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


@pytest.mark.tensorrt
def test_shared_activation_area(unet_plan: Path) -> None:
    from trtkit.runtime.engine import Engine, SharedActivations

    shared = SharedActivations()
    a = Engine.load(unet_plan, activations=shared)
    b = Engine.load(unet_plan, activations=shared)
    assert shared.size == max(a.device_memory_size(), b.device_memory_size())
    assert a._device_memory == b._device_memory == shared.buffer.ptr


@pytest.mark.tensorrt
def test_bind_rejects_bad_shapes_and_dtypes(unet_plan: Path) -> None:
    from trtkit.runtime.cuda import DeviceArray
    from trtkit.runtime.engine import Engine

    e = Engine.load(unet_plan)
    bufs = e.allocate()
    big = dict(bufs, sample=DeviceArray.empty((2, 4, 64, 64), bufs["sample"].dtype))
    with pytest.raises(EngineError, match="outside the engine's profile"):
        e.bind(big)
    wrong = dict(bufs, timestep=DeviceArray.empty((1,), np.float16))
    with pytest.raises(EngineError, match="engine wants"):
        e.bind(wrong)


@pytest.mark.tensorrt
def test_version_compatible_plan_needs_trust(tiny_unet_onnx: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from trtkit.runtime.engine import Engine

    plan = _build(tiny_unet_onnx, tmp_path / "vc.plan", tiny_model_dir, version_compatible=True)
    with pytest.raises(EngineError, match="trust-engine"):
        Engine.load(plan)
    assert Engine.load(plan, trust_engine=True).outputs == ["noise_pred"]


@pytest.mark.tensorrt
def test_tensorrt_loop_graph_equals_eager(unet_plan: Path, tiny_model_dir: Path) -> None:
    """The whole loop over the engine, captured with cuda-python: same latents as the eager loop."""
    from trtkit.runtime.engine import Engine
    from trtkit.runtime.executors import LoopShape, TensorRTExecutor
    from trtkit.runtime.graph_runner import LoopRunner
    from trtkit.runtime.schedulers import make_scheduler, make_tables

    ex = TensorRTExecutor(Engine.load(unet_plan))
    shape = LoopShape(1, 4, 32, 32, True, 77, 64, 32, 6)
    tab = make_tables(make_scheduler("euler", {"steps_offset": 1, "beta_schedule": "scaled_linear",
                                              "beta_start": 0.00085, "beta_end": 0.012}), 10, "euler")
    rng = np.random.default_rng(0)
    inputs = {k: rng.standard_normal(s).astype(np.float32) for k, (s, kind) in shape.unet_io().items()
              if k not in ("sample", "timestep", "noise_pred")}
    x = rng.standard_normal(shape.latent).astype(np.float32) * tab.init_noise_sigma
    eager = LoopRunner(ex, use_graph=False)(shape, tab, x_init=x, guidance=5.0, **inputs)
    graph = LoopRunner(ex, use_graph=True)(shape, tab, x_init=x, guidance=5.0, **inputs)
    np.testing.assert_array_equal(graph, eager)


@pytest.mark.tensorrt
def test_pipeline_with_all_engines(tiny_model_dir: Path, unet_plan: Path, tmp_path: Path) -> None:
    """unet + text encoders + VAE as engines sharing one activation area: the same latents as the torch
    pipeline (fp16 UNet on both sides; engines in fp32 here, so within 2e-2 of the range)."""
    import shutil

    from trtkit.exporter import ExportConfig, export
    from trtkit.runtime.pipeline import Pipeline, RunConfig

    folder = tmp_path / "engines"
    folder.mkdir()
    shutil.copy(unet_plan, folder / "unet.plan")
    for comp in ("text_encoder", "text_encoder_2", "vae_decoder"):
        r = export(ExportConfig(model_dir=tiny_model_dir, component=comp, profile="tiny-256", out_dir=tmp_path / comp))
        _build(r.path, folder / f"{comp}.plan", tiny_model_dir, component=comp)
    cfg = RunConfig(model_dir=tiny_model_dir, prompt="a red cube", steps=8, height=256, width=256)
    trt_pipe = Pipeline(tiny_model_dir, engines=folder)
    assert set(trt_pipe.encoders.engines) == {"unet", "text_encoder", "text_encoder_2", "vae_decoder"}
    mem = {e._device_memory for e in trt_pipe.encoders.engines.values()}
    assert len(mem) == 1  # one shared activation area
    got = trt_pipe(cfg)
    want = Pipeline(tiny_model_dir)(cfg)
    err = np.abs(got.latents - want.latents).max() / np.abs(want.latents).max()
    assert err < 2e-2 and got.image.size == (256, 256)
