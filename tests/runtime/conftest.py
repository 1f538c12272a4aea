"""Real TensorRT-RTX plans of the tiny pipeline, built once per session on the CPU (one target, SM89), whose
x.json metadata and plan headers the runtime's decision functions are tested against (tests/runtime/test_plan.py,
test_components.py). Smallest shapes: the tiny-256 preset and one 16x16-latent static profile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

TARGET = ("8.9",)


@pytest.fixture(scope="module")
def one_torch_thread():  # type: ignore[no-untyped-def]
    """The tiny UNets on one torch thread: with two on a loaded two-core machine (load ~8)
    tests/runtime/test_accelerate.py took 162 s, with one 27 s."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _build(onnx: Path, out: Path, **kw: Any) -> dict[str, Any]:
    from trtkit.builder.build import build
    from trtkit.builder.config import BuildConfig

    r = build(BuildConfig(onnx=onnx, output=out, target_cc=TARGET, progress=False, **kw))
    return {"plan": r.plan, "meta": json.loads(r.metadata.read_text())}


@pytest.fixture(scope="session")
def rtx_unet_plans(rtx_unet_builds: dict) -> dict[str, dict[str, Any]]:
    """precision -> {plan, meta}: the tiny UNet in FP16, INT8 and FP8, each with two profiles (tiny-256, then
    a static 16x16-latent one); the same builds the builder's tests check (tests/conftest.py)."""
    return {p: {"plan": r.plan, "meta": json.loads(r.metadata.read_text())} for p, (_, r) in rtx_unet_builds.items()}


@pytest.fixture(scope="session")
def rtx_pipeline_plans(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """component -> {plan, meta}: the tiny pipeline's two text encoders and VAE decoder, FP16, the tiny-256
    preset profile."""
    pytest.importorskip("tensorrt_rtx")
    from trtkit.exporter import ExportConfig, export

    d = tmp_path_factory.mktemp("rtx-text")
    out = {}
    for comp in ("text_encoder", "text_encoder_2", "vae_decoder"):
        onnx = export(ExportConfig(model_dir=tiny_model_dir, component=comp, profile="tiny-256", out_dir=d / comp)).path
        out[comp] = _build(onnx, d / "engines" / f"{comp}.plan", profiles=("tiny-256",), precision="fp16",
                           model_dir=tiny_model_dir)
    return out


@pytest.fixture(scope="session")
def rtx_bf16_plan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny network with BF16 input and output (strongly typed), as a BF16-exported model has."""
    pytest.importorskip("tensorrt_rtx")
    from runtime_models import bf16_relu

    d = tmp_path_factory.mktemp("rtx-bf16")
    return _build(bf16_relu(d / "relu.onnx"), d / "relu.plan", min_shapes="x:1x64", opt_shapes="x:2x64",
                  max_shapes="x:4x64")
