"""The DiT engine executor (runtime/dit_engine.py) on real data: the tiny FLUX / SD3 transformers exported by
`trtkit export -c transformer` (tiny-256 profile), their I/O read from the ONNX file and, where TensorRT-RTX is
installed, from the x.json of a real plan built from it.

No TensorRT can execute a plan here, so the loop test runs the executor's own binding and broadcast code on the
CPU loop with the exported ONNX run by onnxruntime in the engine's place (`OnnxEngine`, engine.Engine's four
calls over an InferenceSession; the tensorrt module is not touched), against DitTorchExecutor on the torch
transformer the ONNX came from: the same latents, and the timestep / guidance the engine is fed equal, bit for
bit, what the torch transformer is called with. The `tensorrt` tests run the same comparison through
`trtkit.accelerate(pipe, engines=...)` where full TensorRT and a GPU exist.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trtkit.errors import TrtkitError
from trtkit.runtime.dit_engine import (
    DitEngineExecutor,
    bindings,
    check_engine,
    engine_timesteps,
    owned_buffers,
    plan_path,
)
from trtkit.runtime.dit_executor import DitLoopShape, DitTorchExecutor
from trtkit.runtime.plan import EngineDesc, EngineError, ProfileSpec, TensorSpec

ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16"}


def onnx_desc(path: Path, model_dir: Path, profile: str = "tiny-256") -> EngineDesc:
    """What a plan built from `path` with `profile` declares: the ONNX file's I/O names, dtypes and fixed
    dimensions, and the profile's ranges as `trtkit build` sets them (profiles_dit.shapes)."""
    import onnx

    from trtkit.profiles import get_profile
    from trtkit.profiles_dit import DitDims, shapes

    g = onnx.load(str(path), load_external_data=False).graph
    spec = [TensorSpec(v.name, k == "in", ONNX_DTYPES[v.type.tensor_type.elem_type],
                       tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim))
            for k, vs in (("in", g.input), ("out", g.output)) for v in vs]
    rng = shapes(get_profile(profile), "transformer", DitDims.from_folder(model_dir))
    return EngineDesc("transformer", tuple(spec), (ProfileSpec(profile, {n: (tuple(r.min), tuple(r.opt), tuple(r.max))
                                                                          for n, r in rng.items()}),))


def flux_shape(batch: int = 1, side: int = 16, text: int = 512) -> DitLoopShape:
    """The tiny FLUX at (16 * side) px: packed token grid side x side, T5 `text` tokens."""
    return DitLoopShape(batch=batch, latent_channels=16, latent_height=side, latent_width=side, cfg=False,
                        text_len=text, text_dim=32, pooled_dim=32, time_ids_dim=None, family="flux",
                        guidance_embed=True)


def sd3_shape(batch: int = 1, cfg: bool = True, side: int = 32) -> DitLoopShape:
    return DitLoopShape(batch=batch, latent_channels=4, latent_height=side, latent_width=side, cfg=cfg,
                        text_len=333, text_dim=32, pooled_dim=64, time_ids_dim=None, family="sd3")


SHAPES = {"flux": flux_shape, "sd3": sd3_shape}


# ------------------------------------------------------------------------------------------------ names, shapes


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_every_engine_tensor_is_bound_at_the_profile(family: str, tiny_dit_onnx: Any, tiny_dit_dir: Any) -> None:
    desc = onnx_desc(tiny_dit_onnx(family), tiny_dit_dir(family))
    assert check_engine(desc, family, family == "flux") == "float32"
    shape = SHAPES[family]()  # 256 x 256, one image (SD3: CFG doubles the batch)
    plan = bindings(desc, shape)
    assert sorted(x.engine for x in plan) == sorted(desc.inputs + desc.outputs)
    opt = desc.profiles[0].ranges
    for x in plan:
        if x.engine in opt:
            assert x.shape == opt[x.engine][1], x  # the run's shapes are the profile's opt shapes
    io = shape.unet_io()
    direct = {x.engine: x.buffer for x in plan if x.source is None}
    assert direct["hidden_states"] == "sample" and direct["noise_pred"] == "noise_pred"
    assert all(io[x.buffer][0] == x.shape for x in plan if x.source is None)
    if family == "flux":  # batch 1: the loop's own (1,) timestep and guidance are the engine's
        assert direct["timestep"] == "timestep" and direct["guidance"] == "guidance_in" and not owned_buffers(plan)
        assert direct["img_ids"] == "img_ids" and io["img_ids"] == ((256, 3), "f32")
    else:  # [negative; prompt]: the timestep is copied into a (2,) buffer of the executor's
        assert owned_buffers(plan) == {"engine_timestep": ((2,), "f32")}
        assert [x.source for x in plan if x.engine == "timestep"] == ["timestep"]


@pytest.mark.parametrize("family,images,guidance", [("flux", 1, 3.5), ("flux", 2, 3.5), ("sd3", 1, 7.0),
                                                     ("sd3", 3, 7.0), ("sd3", 1, 1.0)])
def test_the_pipelines_own_loop_shape_binds_at_the_profile(family: str, images: int, guidance: float,
                                                            tiny_dit_onnx: Any, tiny_dit_dir: Any,
                                                            one_torch_thread: None) -> None:
    """The DitLoopShape an accelerated diffusers pipeline builds for a 256x256 call (its T5 length, packing, CFG
    batch) against the exported engine's profile: bound at opt x images, or refused in one line where the
    profile has no such batch (SD3 without CFG: batch 1, the tiny-256 profile starts at the CFG batch 2)."""
    from diffusers import DiffusionPipeline

    import trtkit

    pipe = trtkit.accelerate(DiffusionPipeline.from_pretrained(tiny_dit_dir(family)))
    pipe.set_progress_bar_config(disable=True)
    pipe("a cat", height=256, width=256, num_inference_steps=1, guidance_scale=guidance,
         num_images_per_prompt=images, output_type="latent", generator=torch.Generator().manual_seed(0))
    shape = pipe._trtkit.runner.loop.shape
    desc = onnx_desc(tiny_dit_onnx(family), tiny_dit_dir(family))
    if family == "sd3" and guidance <= 1:
        with pytest.raises(EngineError, match="no optimization profile covers .*hidden_states min 2x4x32x32"):
            bindings(desc, shape)
        return
    plan = {x.engine: x.shape for x in bindings(desc, shape)}
    b = images * (2 if family == "sd3" else 1)
    for n, (lo, opt, hi) in desc.profiles[0].ranges.items():
        want = (b,) + opt[1:] if lo[0] != hi[0] or n in ("timestep", "guidance") else opt
        assert plan[n] == want, (n, plan[n], want)
    assert plan["noise_pred"] == plan["hidden_states"]


def test_batches_and_refusals(tiny_dit_onnx: Any, tiny_dit_dir: Any) -> None:
    flux = onnx_desc(tiny_dit_onnx("flux"), tiny_dit_dir("flux"))
    plan = bindings(flux, flux_shape(batch=3))
    assert owned_buffers(plan) == {"engine_timestep": ((3,), "f32"), "engine_guidance": ((3,), "f32")}
    assert {x.engine: x.shape for x in plan}["hidden_states"] == (3, 256, 16)
    cases = [(flux, flux_shape(batch=5), "hidden_states min 1x256x16, max 4x256x16"),  # batch past the profile
             (flux, flux_shape(side=32), "hidden_states"),  # 512 px: 1024 tokens, the profile has 256
             (flux, flux_shape(text=256), "encoder_hidden_states"),  # max_sequence_length=256: 512 built
             (flux, dataclasses.replace(flux_shape(), guidance_embed=False), "guidance_embeds is False")]
    sd3 = onnx_desc(tiny_dit_onnx("sd3"), tiny_dit_dir("sd3"))
    cases += [(sd3, sd3_shape(cfg=False), "hidden_states min 2x4x32x32"),  # guidance 1: batch 1, built for 2..8
              (sd3, sd3_shape(side=40), "hidden_states")]
    for desc, shape, match in cases:
        with pytest.raises(EngineError, match=match) as e:
            bindings(desc, shape)
        assert "\n" not in str(e.value)


def test_check_engine_refusals(tiny_dit_onnx: Any, tiny_dit_dir: Any) -> None:
    flux = onnx_desc(tiny_dit_onnx("flux"), tiny_dit_dir("flux"))
    sd3 = onnx_desc(tiny_dit_onnx("sd3"), tiny_dit_dir("sd3"))

    def retype(desc: EngineDesc, **dtypes: str) -> EngineDesc:
        return dataclasses.replace(desc, tensors=tuple(dataclasses.replace(t, dtype=dtypes.get(t.name, t.dtype))
                                                       for t in desc.tensors))

    cases = [(sd3, "flux", True, "missing guidance, img_ids, txt_ids"),
             (flux, "sd3", False, "extra guidance, img_ids, txt_ids"),
             (flux, "flux", False, "extra guidance"),  # a guidance-distilled engine for a schnell-like config
             (retype(flux, timestep="float16"), "flux", True, "timestep is float16; the loop feeds float32"),
             (retype(sd3, noise_pred="float16"), "sd3", False, "noise_pred float16"),
             (retype(flux, hidden_states="bfloat16", encoder_hidden_states="bfloat16",
                     pooled_projections="bfloat16", noise_pred="bfloat16", img_ids="bfloat16"), "flux", True,
              "img_ids is bfloat16")]
    for desc, family, guid, match in cases:
        with pytest.raises(EngineError, match=match) as e:
            check_engine(desc, family, guid)
        assert "\n" not in str(e.value)
    bf16 = retype(sd3, hidden_states="bfloat16", encoder_hidden_states="bfloat16", pooled_projections="bfloat16",
                  noise_pred="bfloat16")
    assert check_engine(bf16, "sd3", False) == "bfloat16"


@pytest.mark.rtx
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_rtx_plan_declares_what_the_onnx_and_profile_say(family: str, tiny_dit_onnx: Any, tiny_dit_dir: Any,
                                                          tmp_path: Path) -> None:
    """A real TensorRT-RTX plan (FP16, tiny-256) describes the same I/O and ranges as onnx_desc, so the
    decisions above are the ones the runtime makes on it."""
    from trtkit.builder.build import build
    from trtkit.builder.config import BuildConfig

    r = build(BuildConfig(onnx=tiny_dit_onnx(family), output=tmp_path / "transformer.plan", profiles=("tiny-256",),
                          precision="fp16", target_cc=("8.9",), progress=False))
    meta = EngineDesc.from_metadata(json.loads(r.metadata.read_text()), "transformer")
    ref = onnx_desc(tiny_dit_onnx(family), tiny_dit_dir(family))
    assert {t.name: (t.is_input, t.dtype) for t in meta.tensors} == {t.name: (t.is_input, t.dtype) for t in ref.tensors}
    assert meta.profiles[0].ranges == ref.profiles[0].ranges
    assert check_engine(meta, family, family == "flux") == "float32"
    assert bindings(meta, SHAPES[family]()) == bindings(ref, SHAPES[family]())
    assert plan_path(tmp_path) == r.plan and plan_path(r.plan) == r.plan


def test_plan_path_refusals(tmp_path: Path) -> None:
    with pytest.raises(TrtkitError, match="has no transformer.plan"):
        plan_path(tmp_path)
    with pytest.raises(TrtkitError, match="does not exist"):
        plan_path(tmp_path / "x.plan")


# ------------------------------------------------------------------------------------------------ conventions


def _torch_flux_timesteps(t: np.ndarray, dtype: str, device: str) -> np.ndarray:
    """FluxPipeline / DitTorchExecutor: `t.expand(B).to(dtype) / 1000`, in torch on `device`."""
    return (torch.from_numpy(t).to(device, getattr(torch, dtype)) / 1000).float().cpu().numpy()


T_GRID = np.arange(8, 8001, dtype=np.float32) / 8  # 1..1000 in steps of 1/8: flow timesteps are sigma * 1000


def test_flux_timestep_rounding_is_torchs() -> None:
    """For every t of T_GRID and each I/O dtype, equal to torch's on the CPU; SD3 passes t unchanged. The CUDA
    form (times the float32 reciprocal) differs from exact division for some t in float32."""
    for dt in ("float32", "float16", "bfloat16"):
        assert np.array_equal(engine_timesteps(T_GRID, "flux", dt, "cpu"), _torch_flux_timesteps(T_GRID, dt, "cpu"))
    assert np.array_equal(engine_timesteps(T_GRID, "sd3", "bfloat16"), T_GRID)
    assert not np.array_equal(engine_timesteps(T_GRID, "flux", "float32"), engine_timesteps(T_GRID, "flux",
                                                                                            "float32", "cpu"))


@pytest.mark.gpu
def test_flux_timestep_rounding_is_torchs_on_cuda() -> None:
    for dt in ("float32", "float16", "bfloat16"):
        assert np.array_equal(engine_timesteps(T_GRID, "flux", dt), _torch_flux_timesteps(T_GRID, dt, "cuda")), dt


class OnnxEngine:
    """engine.Engine's calls (desc, bind, execute, fingerprint, capturable) over onnxruntime on the CPU: the
    exported ONNX stands where the plan built from it would run. Records what each call was fed."""

    def __init__(self, path: Path, desc: EngineDesc) -> None:
        import onnxruntime as ort

        self.desc, self.arrays = desc, {}
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.fed: list[dict[str, np.ndarray]] = []

    def bind(self, arrays: dict[str, np.ndarray]) -> None:
        from trtkit.runtime.plan import pick_profile

        pick_profile(self.desc, {n: a.shape for n, a in arrays.items() if n in self.desc.inputs})
        self.arrays = dict(arrays)

    def execute(self, stream: int) -> None:
        feeds = {n: np.array(self.arrays[n], np.float32) for n in self.desc.inputs}
        self.fed.append(feeds)
        self.arrays["noise_pred"][...] = self.session.run(["noise_pred"], feeds)[0]

    def fingerprint(self) -> tuple:
        return ()

    def capturable(self, stream: int) -> bool:
        return True


def _inputs(shape: DitLoopShape, seed: int = 0) -> dict[str, Any]:
    g = np.random.default_rng(seed)
    b = shape.unet_batch
    out: dict[str, Any] = {"x_init": g.standard_normal(shape.latent),
                           "encoder_hidden_states": g.standard_normal((b, shape.text_len, shape.text_dim)),
                           "pooled_projections": g.standard_normal((b, shape.pooled_dim))}
    if shape.family == "flux":
        ids = np.zeros((shape.latent_height, shape.latent_width, 3))
        ids[..., 1] = np.arange(shape.latent_height)[:, None]
        ids[..., 2] = np.arange(shape.latent_width)[None, :]
        out |= {"img_ids": ids.reshape(-1, 3), "txt_ids": np.zeros((shape.text_len, 3)),
                "guidance_in": np.array([3.5])}
    return {k: v.astype(np.float32) for k, v in out.items()}


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_loop_over_the_exported_onnx_equals_the_torch_loop(family: str, tiny_dit_onnx: Any, tiny_dit_dir: Any,
                                                           one_torch_thread: None) -> None:
    from diffusers import DiffusionPipeline

    from trtkit.runtime.flow_tables import make_flow_tables, pipeline_timestep_args
    from trtkit.runtime.graph_runner import LoopRunner

    pipe = DiffusionPipeline.from_pretrained(tiny_dit_dir(family))
    shape = flux_shape(batch=2) if family == "flux" else sd3_shape()  # both broadcast their timestep
    tables = make_flow_tables(pipe.scheduler, pipeline_timestep_args(family, pipe.scheduler, 3, 256))
    seen: list[dict[str, np.ndarray]] = []

    def record(module: Any, args: Any, kw: dict[str, Any]) -> None:
        seen.append({k: kw[k].numpy().copy() for k in ("timestep", "guidance") if kw.get(k) is not None})

    pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    inp = _inputs(shape)
    ref = LoopRunner(DitTorchExecutor(pipe.transformer), device="cpu")(shape, tables, guidance=4.0, **inp)
    engine = OnnxEngine(tiny_dit_onnx(family), onnx_desc(tiny_dit_onnx(family), tiny_dit_dir(family)))
    runner = LoopRunner(DitEngineExecutor(engine, family, family == "flux", device="cpu"), device="cpu")
    ours = runner(shape, tables, guidance=4.0, **inp)
    assert len(engine.fed) == len(seen) == 3
    for fed, torch_kw in zip(engine.fed, seen, strict=True):
        assert np.array_equal(fed["timestep"], torch_kw["timestep"])  # (B,), FLUX: t / 1000 as torch rounds it
        assert fed["timestep"].shape == (shape.unet_batch,)
        if family == "flux":
            assert np.array_equal(fed["guidance"], torch_kw["guidance"]) and fed["guidance"].tolist() == [3.5, 3.5]
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    assert np.isfinite(ours).all() and rel < 1e-4, rel  # onnxruntime vs torch float32 over 3 steps
    assert not np.allclose(ours, inp["x_init"])


# ------------------------------------------------------------------------------------------------ TensorRT + GPU


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_accelerate_with_engine_close_to_torch(family: str, tiny_dit_onnx: Any, tiny_dit_dir: Any,
                                               tmp_path: Path) -> None:
    """Full TensorRT on a GPU: the tiny transformer built FP32 (tiny-256), run by accelerate(pipe, engines=...)
    in the loop graph, against the accelerated torch transformer (float32) on the same seed."""
    from diffusers import DiffusionPipeline

    import trtkit
    from trtkit.builder.build import build
    from trtkit.builder.config import BuildConfig

    build(BuildConfig(onnx=tiny_dit_onnx(family), output=tmp_path / "transformer.plan", profiles=("tiny-256",),
                      precision="fp32", backend="trt", progress=False))
    ref = trtkit.accelerate(DiffusionPipeline.from_pretrained(tiny_dit_dir(family)).to("cuda"))
    eng = trtkit.accelerate(DiffusionPipeline.from_pretrained(tiny_dit_dir(family)).to("cuda"), engines=tmp_path)
    assert eng._trtkit.executor.name == "tensorrt"
    kw: dict[str, Any] = dict(prompt="a cat", height=256, width=256, num_inference_steps=4, output_type="latent")
    if family == "flux":
        kw["guidance_scale"] = 3.5
    a = ref(**kw, generator=torch.Generator().manual_seed(0)).images.float()
    b = eng(**kw, generator=torch.Generator().manual_seed(0)).images.float()
    b2 = eng(**kw, generator=torch.Generator().manual_seed(0)).images.float()
    assert "_trtkit_timings_ms" in eng.__dict__ and eng._trtkit.runner.captures == 1 and torch.equal(b, b2)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-3


def test_accelerate_with_engines_refusals(tiny_dit_dir: Any, tmp_path: Path) -> None:
    """One line each, before any engine is read: compile with an engine, the pipeline on the CPU, a bad backend."""
    from diffusers import DiffusionPipeline

    import trtkit

    p = DiffusionPipeline.from_pretrained(tiny_dit_dir("flux"))
    (tmp_path / "transformer.plan").write_bytes(b"x")
    for kw, match in (({"compile": True}, "compile is for the torch transformer"), ({}, "need a CUDA GPU"),
                      ({"backend": "x"}, "backend must be")):
        with pytest.raises(TrtkitError, match=match) as e:
            trtkit.accelerate(p, engines=tmp_path, **kw)
        assert "\n" not in str(e.value)
    assert getattr(p, "_trtkit", None) is None  # nothing half-done: the pipeline is left as it was


class DeviceCopyEngine:
    """engine.Engine's calls on a GPU without TensorRT: noise_pred = hidden_states (one device copy on the loop's
    stream), so the loop's result is known (runtime_fakes.reference_copy_loop); what the executor adds around
    the engine (the (B,) timestep and guidance buffers, filled by device copies inside the captured graph) is
    read back after the loop."""

    def __init__(self, desc: EngineDesc) -> None:
        self.desc, self.arrays = desc, {}

    def bind(self, arrays: dict[str, Any]) -> None:
        self.arrays = dict(arrays)

    def execute(self, stream: int) -> None:
        from trtkit.runtime.cuda import copy_bytes

        src, dst = self.arrays["hidden_states"], self.arrays["noise_pred"]
        copy_bytes(dst.ptr, src.ptr, src.nbytes, stream)

    def fingerprint(self) -> tuple:
        return ()

    def capturable(self, stream: int) -> bool:
        return True


@pytest.mark.gpu
@pytest.mark.parametrize("use_graph", [False, True])
def test_device_loop_fills_the_engine_buffers(use_graph: bool, tiny_dit_onnx: Any, tiny_dit_dir: Any) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from runtime_fakes import reference_copy_loop

    from trtkit.runtime.flow_tables import make_flow_tables, pipeline_timestep_args
    from trtkit.runtime.graph_runner import LoopRunner

    desc = onnx_desc(tiny_dit_onnx("flux"), tiny_dit_dir("flux"))
    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    tables = make_flow_tables(sch, pipeline_timestep_args("flux", sch, 5, 256))
    shape = flux_shape(batch=3)
    inp = _inputs(shape)
    runner = LoopRunner(DitEngineExecutor(DeviceCopyEngine(desc), "flux", True), device="cuda", use_graph=use_graph)
    out = runner(shape, tables, guidance=1.0, **inp)
    ref = reference_copy_loop(tables, inp["x_init"], 1.0, False, None)
    assert np.abs(out - ref).max() <= 1e-6 * np.abs(ref).max()
    h = runner.loop.handle
    assert runner.loop.io["engine_timestep"].download(h).tolist() == [engine_timesteps(tables.timesteps, "flux",
                                                                                        "float32")[-1]] * 3
    assert runner.loop.io["engine_guidance"].download(h).tolist() == [3.5] * 3
    assert runner.captures == int(use_graph)
