"""FP8 in torch for DiT transformers (trtkit/runtime/fp8.py): calibration file -> per-module static scales,
which modules get FP8 and why not (CPU, no torchao); torchao's FP8 linears with exactly the file's scales
(CPU where torchao imports: torch._scaled_mm runs there too); on an H200: accuracy vs BF16, regional
compile, and the FLUX.1-size calibration time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from trtkit import calibfile
from trtkit.errors import TrtkitError
from trtkit.runtime import fp8


def _tiny(family: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):  # type: ignore[no-untyped-def]
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from trtkit.tiny_dit import tiny_dit_config

    torch.manual_seed(0)
    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    return cls(**tiny_dit_config(family)["transformer"]).to(device=device, dtype=dtype).eval()


def _inputs(family: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if family == "flux":
        S, T = 64, 16
        return dict(hidden_states=r(2, S, 16), encoder_hidden_states=r(2, T, 32), pooled_projections=r(2, 32),
                    timestep=torch.tensor([0.7, 0.7], device=device), guidance=torch.tensor([3.5, 3.5], device=device),
                    img_ids=torch.zeros(S, 3, device=device), txt_ids=torch.zeros(T, 3, device=device))
    return dict(hidden_states=r(2, 4, 16, 16), encoder_hidden_states=r(2, 24, 32), pooled_projections=r(2, 64),
                timestep=torch.tensor([700.0, 700.0], device=device))


def _calibration(tr, family: str, path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Path:  # type: ignore[no-untyped-def]
    """An FP8 level-4 file for `tr` as `trtkit calibrate --fp8` writes it (attention ranges included)."""
    from trtkit.calibration.calibrate import Recipe, build_calibration
    from trtkit.calibration.hooks_dit import tapped_dit, targets
    from trtkit.calibration.stats import StepStats

    tg = targets(tr, 4.0, "fp8")
    stats = StepStats(1)
    with torch.no_grad(), tapped_dit(tr, tg, stats.observe):
        stats.begin_pass()
        tr(**_inputs(family, dtype, device, seed=0), return_dict=False)
    return calibfile.save(build_calibration(stats, tr, Recipe(precision="fp8"), {"component": "transformer"}), path)


# -- CPU: the plumbing ------------------------------------------------------------------------------------


def test_exclusions_are_the_qdq_pass_ones() -> None:
    from trtkit.graph.patterns_dit import DIT_EXCLUDE

    assert fp8.HIGH_PRECISION_ROOTS == tuple(root for root, _ in DIT_EXCLUDE)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_plan_from_a_calibration_file(family: str, tmp_path: Path) -> None:
    tr = _tiny(family)
    path = _calibration(tr, family, tmp_path / "c.json")
    cal = calibfile.load(path)
    amax = fp8.amax_from_calibration(path)
    # attention BMM ranges stay out (no static FP8 attention in torchao); every linear range is taken
    assert set(amax) == {k for k in cal.activations if k.rsplit(".", 1)[-1] not in calibfile.ATTENTION_INPUTS}
    assert any(k.endswith(".q_bmm") for k in cal.activations)
    layers, why_not = fp8.plan_fp8(tr, amax)
    assert set(layers) == set(amax) and not why_not
    for name, lay in layers.items():
        assert lay.scale == cal.activations[name] / 448.0 and lay.amax == cal.activations[name]
    # what the pass keeps high precision is never FP8, even when a range is given for it
    extra = {"proj_out": 1.0, "norm_out.linear": 1.0, "context_embedder": 2.0} if family == "flux" else \
        {"proj_out": 1.0, "pos_embed.proj": 1.0}
    layers2, why_not2 = fp8.plan_fp8(tr, {**amax, **extra}, exclude=("ff_context",))
    assert set(why_not2) == set(extra) | {k for k in amax if "ff_context" in k}
    assert all("kept high precision" in why_not2[k] for k in extra)
    with pytest.raises(TrtkitError, match="another model"):
        fp8.plan_fp8(tr, {"transformer_blocks.7.attn.to_q": 1.0})


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_input_rank_rule(family: str) -> None:
    """torchao wants the static scale with the input's rank: the name rule matches a real forward."""
    tr = _tiny(family)
    seen: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, a[0].ndim))
             for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        tr(**_inputs(family), return_dict=False)
    for h in hooks:
        h.remove()
    assert seen and {n: r for n, r in seen.items() if fp8.input_ndim(n) != r and fp8.excluded(n) is None} == {}


def test_smoothquant_file_is_refused(tmp_path: Path) -> None:
    import numpy as np

    cal = calibfile.Calibration(precision="int8", activations={"a": 1.0}, smooth={"a": np.ones(4, np.float32)},
                                settings={"m": 1})
    with pytest.raises(TrtkitError, match="SmoothQuant"):
        fp8.amax_from_calibration(calibfile.save(cal, tmp_path / "sq.json"))


def test_without_torchao_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(TrtkitError, match="torchao"):
        fp8.quantize_fp8(_tiny("flux"), {"transformer_blocks.0.attn.to_q": 1.0})


# -- torchao (CPU where it imports; the GEMM is torch._scaled_mm) ----------------------------------------


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_torchao_fp8_uses_the_file_scales(family: str, tmp_path: Path) -> None:
    pytest.importorskip("torchao.quantization")
    tr = _tiny(family, torch.bfloat16)
    path = _calibration(tr, family, tmp_path / "c.json", torch.bfloat16)
    x = _inputs(family, torch.bfloat16)
    with torch.no_grad():
        ref = tr(**x, return_dict=False)[0].float()
    applied = fp8.quantize_fp8(tr, path)
    cal = calibfile.load(path)
    used = fp8.applied_scales(tr)
    assert set(used) == set(applied) == set(fp8.amax_from_calibration(path))
    for k, s in used.items():  # the GEMMs' static scale is the Q/DQ ONNX's amax/448 (float32)
        assert s == pytest.approx(cal.activations[k] / 448.0, rel=1e-7), k
    with torch.no_grad():
        got = tr(**x, return_dict=False)[0].float()
    err = float((got - ref).norm() / ref.norm())
    print(f"\n{family} torchao FP8 vs BF16 (CPU): relative error {err:.4f}")
    assert 1e-4 < err < 0.05


# -- H200 -------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_fp8_on_gpu_tiny_flux(tmp_path: Path) -> None:
    """Tiny FLUX on the GPU in BF16: GPU calibration over the pipeline-free steps, the file, FP8 with the file's
    scales, error vs BF16, regional compile (same output as eager FP8)."""
    pytest.importorskip("torchao.quantization")
    from trtkit.calibration.dit_amax import calibrate_transformer_amax, save_calibration

    tr = _tiny("flux", torch.bfloat16, "cuda")
    steps = [_inputs("flux", torch.bfloat16, "cuda", seed=s) for s in range(4)]
    for i, s in enumerate(steps):
        s["timestep"] = torch.full((2,), 1.0 - i / 4, device="cuda")
    amax = calibrate_transformer_amax(tr, inputs=steps)
    path = save_calibration(amax, tmp_path / "fp8.json", tr)
    x = _inputs("flux", torch.bfloat16, "cuda", seed=9)
    with torch.no_grad():
        ref = tr(**x, return_dict=False)[0].float()
    fp8.quantize_fp8(tr, path)
    assert fp8.applied_scales(tr) == pytest.approx({k: v / 448.0 for k, v in amax.items()}, rel=1e-7)
    with torch.no_grad():
        eager = tr(**x, return_dict=False)[0].float()
    err = float((eager - ref).norm() / ref.norm())
    how = fp8.regional_compile(tr)
    t0 = time.perf_counter()
    with torch.no_grad():
        comp = tr(**x, return_dict=False)[0].float()
    print(f"\ntiny FLUX FP8 vs BF16 on GPU: {err:.4f}; {how}: first call {time.perf_counter() - t0:.1f} s, "
          f"compiled vs eager {float((comp - eager).norm() / eager.norm()):.5f}")
    assert how == "compile_repeated_blocks"
    assert 1e-4 < err < 0.05
    assert float((comp - eager).norm() / eager.norm()) < 0.01


FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}


@pytest.mark.gpu
def test_flux_size_calibration_under_a_minute() -> None:
    """FLUX.1-dev's transformer (random weights, BF16), 1024x1024, 512 T5 tokens: 28 calibration steps in < 60 s,
    then FP8 + regional compile and one timed step against BF16."""
    pytest.importorskip("torchao.quantization")
    from diffusers import FluxTransformer2DModel

    from trtkit.calibration.dit_amax import calibrate_transformer_amax

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in BF16 on the device: no 48 GB FP32 copy
    try:
        with torch.device("cuda"):
            tr = FluxTransformer2DModel(**FLUX_DEV).eval()
    finally:
        torch.set_default_dtype(prev)
    S, T = 4096, 512

    def step(sigma: float) -> dict:
        return dict(hidden_states=torch.randn(1, S, 64, device="cuda", dtype=torch.bfloat16),
                    encoder_hidden_states=torch.randn(1, T, 4096, device="cuda", dtype=torch.bfloat16),
                    pooled_projections=torch.randn(1, 768, device="cuda", dtype=torch.bfloat16),
                    timestep=torch.tensor([sigma], device="cuda"), guidance=torch.tensor([3.5], device="cuda"),
                    img_ids=torch.zeros(S, 3, device="cuda"), txt_ids=torch.zeros(T, 3, device="cuda"))

    steps = [step(1.0 - i / 28) for i in range(28)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    amax = calibrate_transformer_amax(tr, inputs=steps)
    took = time.perf_counter() - t0
    finite = sum(1 for v in amax.values() if v < float("inf"))
    print(f"\nFLUX.1-size calibration: 28 steps in {took:.1f} s, {len(amax)} linear inputs ({finite} finite)")
    assert took < 60 and len(amax) == 19 * 12 + 38 * 4

    def timed(n: int = 3) -> float:
        with torch.no_grad():
            tr(**steps[0], return_dict=False)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                tr(**steps[0], return_dict=False)
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / n

    bf16 = timed()
    fp8.quantize_fp8(tr, amax)
    t1 = time.perf_counter()
    how = fp8.regional_compile(tr)
    with torch.no_grad():
        tr(**steps[0], return_dict=False)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t1
    f8 = timed()
    print(f"FLUX.1-size step: BF16 eager {bf16 * 1e3:.0f} ms, FP8 {how} {f8 * 1e3:.0f} ms "
          f"(compile {compile_s:.0f} s)")
    assert compile_s < 300


@pytest.mark.parametrize(("family", "how"), [("flux", "compile_repeated_blocks"), ("sd3", "torch.compile of 2 blocks")])
def test_regional_compile_plumbing(family: str, how: str) -> None:
    """FLUX lists its repeated block classes (diffusers' compile_repeated_blocks); SD3 does not in diffusers
    0.42, so each block of its block list is compiled. The eager backend: the plumbing, not inductor, on CPU."""
    tr = _tiny(family)
    x = _inputs(family)
    with torch.no_grad():
        ref = tr(**x, return_dict=False)[0]
        assert fp8.regional_compile(tr, backend="eager") == how
        got = tr(**x, return_dict=False)[0]
    blocks = [b for attr in fp8.BLOCK_LISTS for b in getattr(tr, attr, [])]
    assert blocks and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    assert getattr(tr, "_compiled_call_impl", None) is None  # not the whole model
    torch.testing.assert_close(got, ref)
