"""`trtkit build --refittable` and `trtkit refit --lora`: the flag is set and recorded (a real TensorRT-RTX build
on the CPU), the weights a LoRA changes are computed before any TensorRT call (their values are checked through
onnxruntime in tests/graph/test_lora_weights.py), and the Refitter call itself runs where TensorRT and a GPU are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from builder_cli import one_line_error, run_cli

from trtkit.builder import metadata as md
from trtkit.builder.refit import refit_weights
from trtkit.errors import TrtkitError
from trtkit.runtime.refit import engine_weights

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora_file(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import UNet2DConditionModel

    from trtkit.tiny_lora import random_lora_state, save_kohya

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir / "unet"))
    return save_kohya(random_lora_state(unet, seed=3), tmp_path_factory.mktemp("lora") / "k.safetensors", alpha=2)


def _meta(onnx: Path, refittable: bool = True, **precision: Any) -> dict[str, Any]:
    return {"settings": {"refittable": refittable}, "onnx": {"path": str(onnx)}, "backend": {"name": "rtx"},
            "precision": {"requested": "fp32", "qdq_types": [], **precision}}


def test_refit_weights_decide_before_tensorrt(tiny_unet_onnx: Path, lora_file: Path) -> None:
    """Which weights, and the one-line refusals; the values themselves are checked in tests/graph/test_lora_weights.py
    (float and re-quantized INT8/FP8, through onnxruntime)."""
    r = refit_weights(_meta(tiny_unet_onnx), lora_file, scale=0.8)
    assert r.layers == len(r.weights) > 0 and all(w.dtype == np.float32 for w in r.weights.values())
    assert r.base == r.onnx == tiny_unet_onnx
    with pytest.raises(TrtkitError, match="not built with --refittable"):
        refit_weights(_meta(tiny_unet_onnx, refittable=False), lora_file)
    with pytest.raises(TrtkitError, match="made inside `trtkit build` and not kept"):
        refit_weights(_meta(tiny_unet_onnx, requested="int8", qdq_types=["int8"]), lora_file)
    with pytest.raises(TrtkitError, match="needs the float ONNX"):
        refit_weights(_meta(tiny_unet_onnx, qdq_types=["int8"]), lora_file)  # an ONNX that came with its Q/DQ
    with pytest.raises(TrtkitError, match="is gone"):
        refit_weights(_meta(tiny_unet_onnx.parent / "moved.onnx"), lora_file)


def test_engine_weight_names() -> None:
    w = {"a": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32), "q": np.ones(2, np.int8)}
    got = engine_weights(w, {"a", "b_fp16", "q"})
    assert set(got) == {"a", "b_fp16", "q"} and got["b_fp16"].dtype == np.float16 and got["q"].dtype == np.int8
    with pytest.raises(TrtkitError, match="1 weight.* not refittable weights of the engine, e.g. b"):
        engine_weights(w, {"a", "q"})


@pytest.mark.rtx
@pytest.mark.gpu
def test_build_refittable_with_rtx_then_refit_cli(tiny_unet_onnx: Path, lora_file: Path, tmp_path: Path) -> None:
    """A real TensorRT-RTX build with REFIT. Not on a CPU-only machine: there TensorRT-RTX 1.7 fails the REFIT build
    in Myelin (`graph_jit.cpp:278: CHECK(status == CUDA_SUCCESS)`, measured; the same build without REFIT works), so
    this needs a GPU. RTX engines do not run on an H100/H200 (compute capability 9.0): there `trtkit refit` computes
    the weights and stops at deserialization with a one-line error, nothing written."""
    plan = tmp_path / "unet.plan"
    p = run_cli("build", str(tiny_unet_onnx), "-p", "tiny-256", "--target-cc", "8.9", "--opt-level", "0",
                "--refittable", "-o", str(plan))
    assert p.returncode == 0, p.stderr
    doc = json.loads(plan.with_suffix(".json").read_text())
    assert doc["settings"]["refittable"] is True and "REFIT" in doc["builder_flags"]
    err = one_line_error(run_cli("refit", str(plan), "--lora", str(lora_file), "--scale", "0.8"))
    assert "needs the GPU the engine runs on" in err or "refit" in err, err
    assert not (tmp_path / "unet-lora.plan").exists()
    err = one_line_error(run_cli("refit", str(plan), "--lora", str(tmp_path / "none.safetensors")))
    assert "no such LoRA file" in err or "not found" in err or "does not exist" in err, err


@pytest.mark.tensorrt
def test_refit_with_tensorrt(tiny_unet_onnx: Path, lora_file: Path, tmp_path: Path) -> None:
    """Full TensorRT on a GPU: build --refittable, refit with the LoRA, and the refit engine holds the new weights."""
    from trtkit.backend import load_backend

    plan = tmp_path / "unet.plan"
    p = run_cli("build", str(tiny_unet_onnx), "-p", "tiny-256", "--backend", "trt", "--refittable", "-o", str(plan))
    assert p.returncode == 0, p.stderr
    p = run_cli("refit", str(plan), "--lora", str(lora_file), "--scale", "0.8")
    assert p.returncode == 0, p.stderr
    out = tmp_path / "unet-lora.plan"
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["lora"]["scale"] == 0.8 and meta["lora"]["weights"] > 0
    b = load_backend("trt")
    engine = b.trt.Runtime(b.logger).deserialize_cuda_engine(out.read_bytes())
    want = refit_weights(json.loads(plan.with_suffix(".json").read_text()), lora_file, scale=0.8).weights
    refitter = b.trt.Refitter(engine, b.logger)
    name = next(iter(want))
    got = np.asarray(refitter.get_named_weights(name).numpy())
    assert np.allclose(got.reshape(want[name].shape), want[name], rtol=1e-3, atol=1e-3)


@pytest.mark.rtx
def test_refit_cli_refusals(tiny_unet_onnx: Path, lora_file: Path, tmp_path: Path) -> None:
    """The CLI as a user meets it, up to the TensorRT call: a plan whose metadata says it is not refittable is
    refused before any work; a refittable one gets its weights computed, then TensorRT-RTX cannot load these
    bytes here (no GPU, and not a real plan): one line, nothing written."""
    plan = tmp_path / "unet.plan"
    plan.write_bytes(b"not a plan")
    meta = _meta(tiny_unet_onnx, refittable=False)
    plan.with_suffix(".json").write_text(json.dumps(dict(meta, format=md.FORMAT)))
    assert "not built with --refittable" in one_line_error(run_cli("refit", str(plan), "--lora", str(lora_file)))
    plan.with_suffix(".json").write_text(json.dumps(dict(_meta(tiny_unet_onnx), format=md.FORMAT)))
    err = one_line_error(run_cli("refit", str(plan), "--lora", str(lora_file), "--scale", "0.8"))
    assert "could not load" in err and "needs the GPU the engine runs on" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.json", "unet.plan"]
