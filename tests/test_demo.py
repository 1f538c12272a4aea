"""`trtkit demo --model flux`: the tiny guidance-distilled FLUX pipeline through every stage on the CPU, as a user
runs it (the CLI, defaults left unset but the folder), and its image equal to what diffusers' FluxPipeline draws
from the saved folder with the same seed. The UNet demo's stages are tested beside their code
(tests/calibration, tests/graph, tests/builder, tests/inspector, tests/runtime)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from trtkit.cli import main

STAGES = ["model", "export", "calibrate", "quantize", "build", "inspect", "run"]


@pytest.fixture(scope="module")
def flux_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """The flux demo run once (2 denoising steps to keep CI short; calibration runs its own 4): its folder
    and stage results, recorded through run_demo's on_stage as the CLI prints them."""
    from trtkit.demo import DemoConfig, run_demo

    workdir = tmp_path_factory.mktemp("demo") / "flux"
    results = run_demo(DemoConfig(workdir=workdir, model="flux", steps=2))
    return workdir, results


def test_flux_demo_runs_every_stage(flux_demo: tuple[Path, list]) -> None:
    from trtkit import calibfile

    workdir, results = flux_demo
    by = {r.name: r for r in results}
    assert [r.name for r in results] == STAGES
    rtx = importlib.util.find_spec("tensorrt_rtx") is not None
    for r in results:
        assert r.status == "done" or (r.name == "build" and not rtx and r.status == "skipped"), (r.name, r.message)
    index = json.loads((workdir / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and "unet" not in index
    assert (workdir / "onnx" / "transformer.onnx").is_file() and "FLUX transformer to ONNX" in by["export"].message
    cal = calibfile.load(workdir / "calib.json")
    assert cal.precision == "fp8" and cal.model["component"] == "transformer" and cal.run["height"] == 256
    assert any(k.endswith(".softmax") for k in cal.activations)  # level 4: the attention BMMs calibrated
    assert by["quantize"].files == [workdir / "onnx" / "transformer.fp8.onnx"]
    assert "FP8 level 4" in by["quantize"].message and "3/3 attention" in by["quantize"].message
    assert "ranges from calibration file" in by["quantize"].message
    assert (workdir / "report.html").is_file()
    assert by["run"].files == [workdir / "image.png"] and "torch FLUX transformer" in by["run"].message


def test_flux_demo_image_is_diffusers(flux_demo: tuple[Path, list]) -> None:
    """The run stage goes through `trtkit run` (pipeline_dit: the accelerated FluxPipeline) on the saved
    folder. Plain diffusers from the same folder, same prompt, steps, size and CPU seed, guidance left at
    FluxPipeline's default (the demo's 3.5), gives the same PNG: both float32 on the CPU in one process with
    the same flow-matching step (measured: bit-identical, also at 8 steps across processes); 1 level of 255 is
    left for BLAS summation order, as in tests/runtime/test_accelerate_dit.py."""
    import torch
    from diffusers import FluxPipeline
    from PIL import Image

    from trtkit.demo import DemoConfig

    workdir, results = flux_demo
    if "on cuda" in results[-1].message:
        pytest.skip("the run stage ran bf16 in one CUDA graph here; test_flux_demo_on_gpu covers that path")
    cfg = DemoConfig()
    pipe = FluxPipeline.from_pretrained(workdir / "model")
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=cfg.prompt, num_inference_steps=2, height=256, width=256,
               generator=torch.Generator("cpu").manual_seed(cfg.seed)).images[0]
    got = np.asarray(Image.open(workdir / "image.png").convert("RGB"), np.int16)
    assert got.shape == (256, 256, 3)
    assert np.abs(got - np.asarray(ref, np.int16)).max() <= 1


@pytest.mark.rtx
def test_flux_demo_builds_an_fp8_plan(flux_demo: tuple[Path, list]) -> None:
    workdir, results = flux_demo
    build = next(r for r in results if r.name == "build")
    plan = workdir / "engines" / "transformer.plan"
    assert build.status == "done" and build.files[:2] == [plan, plan.with_suffix(".json")]
    doc = json.loads(plan.with_suffix(".json").read_text())
    assert doc["precision"]["engine"] == "fp8" and [p["name"] for p in doc["profiles"]] == ["tiny-256"]


@pytest.mark.gpu
def test_flux_demo_on_gpu(flux_demo: tuple[Path, list]) -> None:
    """On a GPU the run stage is `trtkit run` in bf16 as one CUDA graph (its equality with an accelerated
    script: tests/runtime/test_pipeline_dit.py::test_run_on_gpu_equals_accelerate)."""
    from PIL import Image

    workdir, results = flux_demo
    assert "torch FLUX transformer, one CUDA graph on cuda" in results[-1].message
    assert Image.open(workdir / "image.png").size == (256, 256)


def test_unknown_demo_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["demo", "--model", "sdxl", "-o", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err == "error: unknown demo model 'sdxl'; expected one of unet, flux"
    assert not (tmp_path / "d").exists()  # refused before the folder is made
