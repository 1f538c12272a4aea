"""The DiT executor (runtime/dit_executor.py): I/O layouts, refusals, fingerprint, and on a GPU the whole loop as
one CUDA graph over the tiny FLUX / SD3 transformers in bf16 (graph == eager bit for bit, close to diffusers),
with a re-capture when the module is compiled or its weights are swapped after a capture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trtkit.errors import TrtkitError
from trtkit.runtime.dit_executor import DitLoopShape, DitTorchExecutor, compile_blocks, family_of


@pytest.fixture(scope="module")
def dit_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from trtkit.tiny_dit import make_tiny_dit_pipeline

    root = tmp_path_factory.mktemp("dit")
    return {f: make_tiny_dit_pipeline(f, root / f, seed=0) for f in ("flux", "sd3")}


def _transformer(path: Path, device: str = "cpu", dtype: Any = torch.float32) -> Any:
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path).transformer.to(device, dtype)


def _flux_shape(b: int = 1, lh: int = 4, lw: int = 6) -> DitLoopShape:
    return DitLoopShape(batch=b, latent_channels=16, latent_height=lh, latent_width=lw, cfg=False, text_len=7,
                        text_dim=32, pooled_dim=32, time_ids_dim=None, family="flux", guidance_embed=True)


def test_layouts() -> None:
    f = _flux_shape(2)
    io = f.unet_io()
    assert f.latent == (2, 24, 16) and io["sample"] == ((2, 24, 16), "io")
    assert io["img_ids"] == ((24, 3), "f32") and io["txt_ids"] == ((7, 3), "f32") and "guidance_in" in io
    s = DitLoopShape(batch=2, latent_channels=4, latent_height=8, latent_width=6, cfg=True, text_len=9, text_dim=32,
                     pooled_dim=64, time_ids_dim=None, family="sd3")
    io = s.unet_io()
    assert s.latent == (2, 4, 8, 6) and io["sample"][0] == (4, 4, 8, 6) and io["pooled_projections"][0] == (4, 64)
    assert "img_ids" not in io and io["noise_pred"][0] == (4, 4, 8, 6)


def test_family_and_refusals(dit_dirs: dict[str, Path]) -> None:
    tf = _transformer(dit_dirs["flux"])
    assert family_of(tf) == "flux" and family_of(_transformer(dit_dirs["sd3"])) == "sd3"
    ex = DitTorchExecutor(tf)
    ex.check_shape(_flux_shape())
    with pytest.raises(TrtkitError, match="joint_attention_dim"):
        ex.check_shape(DitLoopShape(**{**_flux_shape().__dict__, "text_dim": 64}))
    with pytest.raises(TrtkitError, match="guidance_embeds"):
        ex.check_shape(DitLoopShape(**{**_flux_shape().__dict__, "guidance_embed": False}))
    sd3 = DitTorchExecutor(_transformer(dit_dirs["sd3"]))
    with pytest.raises(TrtkitError, match="patch size"):
        sd3.check_shape(DitLoopShape(batch=1, latent_channels=4, latent_height=9, latent_width=8, cfg=True,
                                     text_len=4, text_dim=32, pooled_dim=64, time_ids_dim=None, family="sd3"))


def test_fingerprint_follows_compile_and_swaps(dit_dirs: dict[str, Path]) -> None:
    """What a graph baked in: compiling blocks (same weights) and replacing a weight both change the key."""
    tf = _transformer(dit_dirs["flux"])
    ex = DitTorchExecutor(tf)
    fp0 = ex.fingerprint()
    assert ex.fingerprint() == fp0
    compile_blocks(tf)  # lazy: nothing compiles before the first call
    fp1 = ex.fingerprint()
    assert fp1 != fp0
    lin = tf.transformer_blocks[0].attn.to_q
    lin.weight = torch.nn.Parameter(lin.weight.detach().clone())  # an FP8-style swap gives new storage
    assert ex.fingerprint() != fp1


def test_compile_scopes(dit_dirs: dict[str, Path]) -> None:
    """blocks: each block compiled, not the model; whole: the model itself; anything else: a one-line error.
    The eager backend: the plumbing, not Inductor, on the CPU."""
    tf = _transformer(dit_dirs["flux"])
    assert compile_blocks(tf, scope="whole", backend="eager") == "torch.compile of the whole transformer"
    assert getattr(tf, "_compiled_call_impl", None) is not None
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in tf.transformer_blocks)
    with pytest.raises(TrtkitError, match="unknown compile scope 'model'"):
        compile_blocks(_transformer(dit_dirs["flux"]), scope="model")


def test_flux_fused_qkv_same_output_no_copy(dit_dirs: dict[str, Path]) -> None:
    """fuse_qkv_shared on FLUX (both streams of the joint blocks, and the single blocks): the same output as
    unfused, and the unfused projections become views of the fused weights (no second copy of them)."""
    from trtkit.runtime.dit_executor import plain_linears
    from trtkit.runtime.kernel_choices import fuse_qkv_shared

    tf = _transformer(dit_dirs["flux"])
    g = torch.Generator().manual_seed(0)
    c = tf.config
    kw = dict(hidden_states=torch.randn(1, 24, c.in_channels, generator=g),
              encoder_hidden_states=torch.randn(1, 7, c.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
              timestep=torch.tensor([0.5]), img_ids=torch.zeros(24, 3), txt_ids=torch.zeros(7, 3),
              guidance=torch.tensor([3.5]), return_dict=False)
    with torch.no_grad():
        ref = tf(**kw)[0]
        assert plain_linears(tf)
        fuse_qkv_shared(tf)
        out = tf(**kw)[0]
    attn = tf.transformer_blocks[0].attn
    assert attn.fused_projections and attn.to_qkv.weight.data_ptr() == attn.to_q.weight.data_ptr()
    assert attn.to_added_qkv.weight.data_ptr() == attn.add_q_proj.weight.data_ptr()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _loop_inputs(shape: DitLoopShape, seed: int = 0) -> dict[str, Any]:
    g = np.random.default_rng(seed)
    b = shape.unet_batch
    io = shape.unet_io()
    out: dict[str, Any] = {"x_init": g.standard_normal(shape.latent).astype(np.float32),
                           "encoder_hidden_states": g.standard_normal((b, shape.text_len, shape.text_dim)),
                           "pooled_projections": g.standard_normal((b, shape.pooled_dim))}
    if "img_ids" in io:
        ids = np.zeros((shape.latent_height, shape.latent_width, 3), np.float32)
        ids[..., 1] = np.arange(shape.latent_height)[:, None]
        ids[..., 2] = np.arange(shape.latent_width)[None, :]
        out["img_ids"] = ids.reshape(-1, 3)
        out["txt_ids"] = np.zeros((shape.text_len, 3), np.float32)
        out["guidance_in"] = np.array([3.5], np.float32)
    return {k: v.astype(np.float32) for k, v in out.items()}


def test_cpu_loop_matches_diffusers_steps(dit_dirs: dict[str, Path]) -> None:
    """The executor inside the CPU loop against a plain diffusers loop (transformer + scheduler.step)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from trtkit.runtime.flow_tables import make_flow_tables, pipeline_timestep_args
    from trtkit.runtime.graph_runner import LoopRunner

    tf = _transformer(dit_dirs["flux"])
    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    shape = _flux_shape()
    targs = pipeline_timestep_args("flux", sch, 3, 24)
    inp = _loop_inputs(shape)
    ours = LoopRunner(DitTorchExecutor(tf), device="cpu")(shape, make_flow_tables(sch, targs), guidance=1.0, **inp)
    sch.set_timesteps(**targs)
    x = torch.from_numpy(inp["x_init"])
    with torch.no_grad():
        for t in sch.timesteps:
            v = tf(hidden_states=x, timestep=t.expand(1) / 1000, guidance=torch.tensor([3.5]),
                   pooled_projections=torch.from_numpy(inp["pooled_projections"]),
                   encoder_hidden_states=torch.from_numpy(inp["encoder_hidden_states"]),
                   txt_ids=torch.from_numpy(inp["txt_ids"]), img_ids=torch.from_numpy(inp["img_ids"]),
                   return_dict=False)[0]
            x = sch.step(v, t, x, return_dict=False)[0]
    assert np.abs(ours - x.numpy()).max() / np.abs(x.numpy()).max() < 1e-5


# ------------------------------------------------------------------------------------------------ GPU


def _gpu_case(dit_dirs: dict[str, Path], family: str) -> tuple[Any, DitLoopShape, Any, dict[str, Any]]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from trtkit.runtime.flow_tables import make_flow_tables, pipeline_timestep_args

    tf = _transformer(dit_dirs[family], "cuda", torch.bfloat16)
    if family == "flux":
        shape = _flux_shape(2, 32, 32)  # 512 x 512
        sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    else:
        shape = DitLoopShape(batch=2, latent_channels=4, latent_height=64, latent_width=64, cfg=True, text_len=77,
                             text_dim=32, pooled_dim=64, time_ids_dim=None, family="sd3")
        sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    tab = make_flow_tables(sch, pipeline_timestep_args(family, sch, 6, 1024))
    return tf, shape, tab, _loop_inputs(shape)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_graph_equals_eager_and_recaptures(dit_dirs: dict[str, Path], family: str) -> None:
    from trtkit.runtime.graph_runner import LoopRunner

    tf, shape, tab, inp = _gpu_case(dit_dirs, family)
    ex = DitTorchExecutor(tf)
    eager = LoopRunner(ex, device="cuda", use_graph=False)(shape, tab, guidance=4.0, **inp)
    runner = LoopRunner(ex, device="cuda", use_graph=True)
    graph = runner(shape, tab, guidance=4.0, **inp)
    assert np.isfinite(graph).all() and np.array_equal(graph, eager)
    again = runner(shape, tab, guidance=4.0, **inp)
    assert runner.captures == 1 and np.array_equal(again, graph)
    # new values in the same buffers: no new capture, another result
    other = runner(shape, tab, guidance=4.0, **(inp | {"x_init": inp["x_init"] * 0.5}))
    assert runner.captures == 1 and not np.array_equal(other, graph)
    # the regionally compiled transformer: same weights, another graph
    compile_blocks(tf)
    comp = runner(shape, tab, guidance=4.0, **inp)
    assert runner.captures == 2
    assert np.abs(comp - graph).max() / np.abs(graph).max() < 0.05
    # a weight replaced (as an FP8 swap does): captured again, and the change shows
    blk = tf.transformer_blocks[0].ff.net[2]
    blk.weight = torch.nn.Parameter(torch.zeros_like(blk.weight), requires_grad=False)
    runner(shape, tab, guidance=4.0, **inp)
    assert runner.captures == 3


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_accelerate_on_gpu_close_to_diffusers(dit_dirs: dict[str, Path], family: str) -> None:
    """bf16 on the GPU: the loop graph keeps the latents in float32 between steps where diffusers rounds them
    to bf16 after every step, so the two differ by bf16 rounding (a wrong sigma or timestep moves them by 0.3 to 1)."""
    from diffusers import DiffusionPipeline

    import trtkit

    ref = DiffusionPipeline.from_pretrained(dit_dirs[family], torch_dtype=torch.bfloat16).to("cuda")
    acc = trtkit.accelerate(DiffusionPipeline.from_pretrained(dit_dirs[family], torch_dtype=torch.bfloat16)
                            .to("cuda"))
    kw = dict(prompt=["a cat", "a dog"], height=256, width=256, num_inference_steps=8, output_type="latent")
    a = ref(**kw, generator=torch.Generator("cuda").manual_seed(0)).images.float()
    b = acc(**kw, generator=torch.Generator("cuda").manual_seed(0)).images.float()
    b2 = acc(**kw, generator=torch.Generator("cuda").manual_seed(0)).images.float()
    assert acc._trtkit.runner.captures == 1 and torch.equal(b, b2)
    assert float((a - b).abs().max() / a.abs().max()) < 0.1
