"""The TensorRT shell (engine.py) on a real TensorRT: marked `tensorrt` (the full TensorRT is not installable
here), or `rtx` + `gpu` for TensorRT-RTX's runtime on an RTX GPU. Plans are built with `trtkit build` from the
tiny pipeline's ONNX as a user builds them. The decisions these tests exercise are checked on the CPU against
real TensorRT-RTX metadata in test_plan.py, test_components.py and test_host_dtypes.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trtkit.errors import TrtkitError
from trtkit.runtime.plan import EngineError

SMALL = "sample:2x4x16x16,timestep:1,encoder_hidden_states:2x77x64,text_embeds:2x32,time_ids:2x6"


def test_missing_plan_is_a_one_line_error(tmp_path: Path) -> None:
    from trtkit.runtime.engine import Engine

    with pytest.raises(TrtkitError, match="does not exist"):
        Engine.load(tmp_path / "unet.plan")


def test_runtime_cache_lives_beside_the_plan(tmp_path: Path) -> None:
    from trtkit.runtime.engine import runtime_cache_path

    assert runtime_cache_path(tmp_path / "unet.plan") == tmp_path / "unet.runtime_cache"


# ------------------------------------------------------------------------------------------------
# with a real TensorRT


def _build(onnx: Path, out: Path, tiny_model_dir: Path | None = None, profiles: tuple[str, ...] = ("tiny-256",),
           backend: str = "trt", **kw: object) -> Path:
    """`trtkit build` as a user runs it (fp32 unless told, so results match onnxruntime closely)."""
    from trtkit.builder.build import build
    from trtkit.builder.config import BuildConfig

    return build(BuildConfig(onnx=onnx, output=out, profiles=profiles, model_dir=tiny_model_dir, backend=backend,
                             progress=False, **kw)).plan  # type: ignore[arg-type]


def _version_compatible(onnx: Path, out: Path, tiny_model_dir: Path) -> Path:
    """`trtkit build` has no version-compatible option: the plain TensorRT builder with VERSION_COMPATIBLE."""
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
    for name, r in get_profile("tiny-256").shapes("unet", ModelDims.from_folder(tiny_model_dir)).items():
        prof.set_shape(name, r.min, r.opt, r.max)
    cfg.add_optimization_profile(prof)
    cfg.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    out.write_bytes(bytes(builder.build_serialized_network(net, cfg)))
    return out


@pytest.fixture(scope="module")
def unet_plan(tiny_unet_onnx: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two profiles: tiny-256 (32x32 latents, batch 2..8), then 16x16 latents at batch 2."""
    return _build(tiny_unet_onnx, tmp_path_factory.mktemp("plan") / "unet.plan", tiny_model_dir,
                  profiles=("tiny-256", SMALL))


def _feeds(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    feeds["timestep"][:] = 500
    return feeds


def _unet_call(b: int, h: int) -> dict[str, tuple[int, ...]]:
    return {"sample": (b, 4, h, h), "timestep": (1,), "encoder_hidden_states": (b, 77, 64), "text_embeds": (b, 32),
            "time_ids": (b, 6)}


@pytest.mark.tensorrt
def test_engine_matches_onnxruntime(unet_plan: Path, tiny_unet_onnx: Path) -> None:
    from trtkit.exporter import run_onnxruntime
    from trtkit.runtime.cuda import Stream
    from trtkit.runtime.engine import Engine

    e = Engine.load(unet_plan)
    assert e.desc.backend == "trt" and [p.name for p in e.desc.profiles] == ["tiny-256", "shapes"]
    bufs = e.allocate()  # once, big enough for every profile
    assert bufs["sample"].shape == (8, 4, 32, 32) and bufs["noise_pred"].shape == (8, 4, 32, 32)
    feeds = _feeds({n: b.shape for n, b in bufs.items() if n in e.inputs})
    s = Stream()
    for n, v in feeds.items():
        bufs[n].upload(v, s.handle)
    e.bind(bufs)
    e.execute(s.handle)
    got = bufs["noise_pred"].download(s.handle)
    want = run_onnxruntime(tiny_unet_onnx, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


@pytest.mark.tensorrt
def test_second_profile_is_used(unet_plan: Path, tiny_unet_onnx: Path) -> None:
    """Finding 2: 16x16 latents only the second profile covers run (profile 1), then 32x32 on profile 0 again."""
    from trtkit.exporter import run_onnxruntime
    from trtkit.runtime.engine import Engine

    e = Engine.load(unet_plan)
    for h, k in ((16, 1), (32, 0)):
        feeds = _feeds(_unet_call(2, h))
        got = e.infer(feeds)["noise_pred"]
        assert e.profile == k and e.context.active_optimization_profile == k
        want = run_onnxruntime(tiny_unet_onnx, feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    with pytest.raises(EngineError, match="no optimization profile covers"):
        e.infer(_feeds(_unet_call(4, 16)))


@pytest.mark.tensorrt
def test_backend_is_read_from_the_plan(unet_plan: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 3: a TensorRT plan runs on TensorRT; a contradicting TRTKIT_BACKEND is one line, not a failed
    deserialization."""
    from trtkit.runtime.engine import Engine

    assert Engine.load(unet_plan).desc.backend == "trt"
    monkeypatch.setenv("TRTKIT_BACKEND", "rtx")
    with pytest.raises(EngineError, match="built by TensorRT; backend rtx cannot run it"):
        Engine.load(unet_plan)


@pytest.mark.tensorrt
def test_bf16_io_round_trip(tmp_path: Path) -> None:
    """Finding 5: BF16 engine I/O through Engine.infer gives relu of the bf16-rounded input (it gave integers)."""
    from runtime_models import bf16_relu

    from trtkit.runtime.engine import Engine

    plan = _build(bf16_relu(tmp_path / "relu.onnx"), tmp_path / "relu.plan", profiles=(),
                  min_shapes="x:1x64", opt_shapes="x:2x64", max_shapes="x:4x64")
    e = Engine.load(plan)
    assert e.dtype_of("x") == e.dtype_of("y") == "bfloat16"
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    import ml_dtypes

    want = np.maximum(x.astype(ml_dtypes.bfloat16).astype(np.float32), 0)
    np.testing.assert_array_equal(e.infer({"x": x})["y"], want)


@pytest.mark.tensorrt
def test_shared_activation_area(unet_plan: Path, tmp_path: Path) -> None:
    """One area for every engine, sized to the largest; an engine needing no memory may come first (finding 12)."""
    from runtime_models import identity

    from trtkit.runtime.engine import Engine, SharedActivations

    ident = _build(identity(tmp_path / "id.onnx"), tmp_path / "id.plan", profiles=(), min_shapes="x:1x64",
                   opt_shapes="x:2x64", max_shapes="x:4x64")
    shared = SharedActivations()
    first = Engine.load(ident, activations=shared)
    a = Engine.load(unet_plan, activations=shared)
    b = Engine.load(unet_plan, activations=shared)
    assert shared.size == max(first.device_memory_size(), a.device_memory_size(), b.device_memory_size())
    assert first._device_memory == a._device_memory == b._device_memory == shared.buffer.ptr
    x = np.ones((2, 64), np.float32)
    np.testing.assert_array_equal(first.infer({"x": x})["y"], x)


@pytest.mark.tensorrt
def test_bind_rejects_bad_shapes_and_dtypes(unet_plan: Path) -> None:
    from trtkit.runtime.cuda import DeviceArray
    from trtkit.runtime.engine import Engine

    e = Engine.load(unet_plan)
    bufs = e.allocate()
    big = dict(bufs, sample=DeviceArray.empty((2, 4, 64, 64), bufs["sample"].dtype))
    with pytest.raises(EngineError, match="no optimization profile covers"):
        e.bind(big)
    wrong = dict(bufs, timestep=DeviceArray.empty((1,), np.float16))
    with pytest.raises(EngineError, match="engine wants"):
        e.bind(wrong)


@pytest.mark.tensorrt
def test_version_compatible_plan_needs_trust(tiny_unet_onnx: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from trtkit.runtime.engine import Engine

    plan = _version_compatible(tiny_unet_onnx, tmp_path / "vc.plan", tiny_model_dir)
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
    graph_runner = LoopRunner(ex, use_graph=True)
    graph = graph_runner(shape, tab, x_init=x, guidance=5.0, **inputs)
    assert graph_runner.use_graph and graph_runner.captures == 1  # full TensorRT: capturable after a warm-up
    np.testing.assert_array_equal(graph, eager)


@pytest.mark.tensorrt
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_pipeline_with_all_engines(tiny_model_dir: Path, unet_plan: Path, tmp_path: Path, guidance: float) -> None:
    """unet + text encoders + VAE as engines sharing one activation area: the same latents as the torch
    pipeline (fp16 UNet on both sides; engines in fp32 here, so within 2e-2 of the range). Finding 1: the text
    encoders run once per prompt (batch 2 with guidance, 1 without), inside the preset's profile. Finding 6:
    the pipeline holds no torch UNet or text encoders."""
    import shutil

    from trtkit.exporter import ExportConfig, export
    from trtkit.runtime.pipeline import Pipeline, RunConfig

    folder = tmp_path / "engines"
    folder.mkdir()
    shutil.copy(unet_plan, folder / "unet.plan")
    for comp in ("text_encoder", "text_encoder_2", "vae_decoder"):
        r = export(ExportConfig(model_dir=tiny_model_dir, component=comp, profile="tiny-256", out_dir=tmp_path / comp))
        _build(r.path, folder / f"{comp}.plan", tiny_model_dir)
    cfg = RunConfig(model_dir=tiny_model_dir, prompt="a red cube", steps=8, height=256, width=256, guidance=guidance)
    trt_pipe = Pipeline(tiny_model_dir, engines=folder)
    assert set(trt_pipe.encoders.engines) == {"unet", "text_encoder", "text_encoder_2", "vae_decoder"}
    assert trt_pipe.pipe.unet is None and trt_pipe.pipe.text_encoder is None and trt_pipe.pipe.text_encoder_2 is None
    assert next(trt_pipe.pipe.vae.parameters()).device.type == "cpu"
    mem = {e._device_memory for e in trt_pipe.encoders.engines.values()}
    assert len(mem) == 1  # one shared activation area
    got = trt_pipe(cfg)
    want = Pipeline(tiny_model_dir)(cfg)
    err = np.abs(got.latents - want.latents).max() / np.abs(want.latents).max()
    assert err < 2e-2 and got.image.size == (256, 256)


@pytest.mark.gpu
@pytest.mark.rtx
def test_rtx_runtime_cache_and_capture(tiny_unet_onnx: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Findings 4 and 17 on an RTX GPU with TensorRT-RTX: contexts from a runtime config, the runtime cache
    written beside the plan after the first run and read at the next load, and the loop either captured
    (is_stream_capturable) or run eagerly with one warning, with the eager result either way."""
    from trtkit.backend import load_backend

    be = load_backend("rtx")
    if not be.can_run:
        pytest.skip(f"TensorRT-RTX cannot run here: {be.why_not_run}")
    from trtkit.runtime.engine import Engine, runtime_cache_path
    from trtkit.runtime.executors import LoopShape, TensorRTExecutor
    from trtkit.runtime.graph_runner import LoopRunner
    from trtkit.runtime.schedulers import make_scheduler, make_tables

    plan = _build(tiny_unet_onnx, tmp_path / "unet.plan", tiny_model_dir, backend="rtx", precision="fp16")
    e = Engine.load(plan)
    assert e.desc.backend == "rtx" and e._rc is not None and e._cache is not None
    assert not runtime_cache_path(plan).exists()
    e.infer(_feeds(_unet_call(2, 32)))
    assert runtime_cache_path(plan).stat().st_size > 0
    Engine.load(plan)  # reads it back (a rejected cache would log a warning)
    shape = LoopShape(1, 4, 32, 32, True, 77, 64, 32, 6)
    tab = make_tables(make_scheduler("euler", {"steps_offset": 1}), 4, "euler")
    rng = np.random.default_rng(0)
    inputs = {k: rng.standard_normal(s).astype(np.float32) for k, (s, kind) in shape.unet_io().items()
              if k not in ("sample", "timestep", "noise_pred")}
    x = rng.standard_normal(shape.latent).astype(np.float32)
    ex = TensorRTExecutor(e)
    eager = LoopRunner(ex, use_graph=False)(shape, tab, x_init=x, guidance=5.0, **inputs)
    runner = LoopRunner(ex, use_graph=True)
    got = runner(shape, tab, x_init=x, guidance=5.0, **inputs)
    assert runner.use_graph == e.capturable(runner.loop.handle)
    np.testing.assert_array_equal(got, eager)
