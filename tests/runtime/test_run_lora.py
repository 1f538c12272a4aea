"""`trtkit run --lora FILE [--lora-scale s]`: on the torch UNet the image diffusers gives with the same LoRA loaded and
fused at that scale (tiny SDXL folder, random LoRA in diffusers and kohya key styles); with --engines, the plan must
be refittable (its metadata), and a weights file of `trtkit refit -o x.safetensors` keeps the scale it was made at.
Every refusal is one line, before the pipeline loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trtkit.cli import main

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/runtime/conftest.py

ARGS = ["--prompt", "a red cube", "--negative-prompt", "blurry", "--steps", "3", "--guidance", "6", "--height", "64",
        "--width", "96", "--seed", "4", "--device", "cpu", "--no-cuda-graph"]


@pytest.fixture(scope="module")
def loras(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from trtkit.tiny_lora import random_lora_state, save_diffusers, save_kohya

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir / "unet"))
    d = tmp_path_factory.mktemp("lora")
    state = random_lora_state(unet, seed=7)
    return {"diffusers": save_diffusers(state, d, "a.safetensors", StableDiffusionXLPipeline, alpha=2),
            "kohya": save_kohya(state, d / "a_kohya.safetensors", alpha=2)}


def _diffusers(model_dir: Path, lora: Path | None, scale: float, output_type: str) -> np.ndarray:
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(str(model_dir))
    if lora is not None:
        p.load_lora_weights(str(lora))
        p.fuse_lora(lora_scale=scale)
    with torch.no_grad():
        out = p("a red cube", negative_prompt="blurry", num_inference_steps=3, guidance_scale=6.0, height=64,
                width=96, generator=torch.Generator("cpu").manual_seed(4), output_type=output_type).images
    return out.float().numpy() if output_type == "latent" else np.asarray(out[0], np.int16)


@pytest.mark.parametrize("style", ["diffusers", "kohya"])
def test_run_lora_is_diffusers_fused(style: str, tiny_model_dir: Path, loras: dict[str, Path]) -> None:
    """The latents `trtkit run` computes (runtime.pipeline.run, what the CLI calls) against diffusers' own pipeline
    with the LoRA loaded and fused at 0.8; the LoRA itself moves them by far more than the tolerance."""
    from trtkit.runtime.pipeline import RunConfig, run

    cfg = RunConfig(tiny_model_dir, "a red cube", "blurry", steps=3, guidance=6.0, seed=4, height=64, width=96,
                    cuda_graph=False, device="cpu", lora=loras[style], lora_scale=0.8)
    got = run(cfg).latents
    want = _diffusers(tiny_model_dir, loras["diffusers"], 0.8, "latent")
    base = _diffusers(tiny_model_dir, None, 1.0, "latent")
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err < 1e-4, f"{style}: {err:.2e}"
    assert float(np.abs(want - base).max() / np.abs(want).max()) > 5e-3, "the LoRA changes nothing"


def test_run_lora_cli_writes_diffusers_image(tiny_model_dir: Path, loras: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "lora.png"
    assert main(["run", str(tiny_model_dir), *ARGS, "--lora", str(loras["kohya"]), "--lora-scale", "0.8",
                 "-o", str(out)]) == 0
    got = np.asarray(Image.open(out), np.int16)
    want = _diffusers(tiny_model_dir, loras["diffusers"], 0.8, "pil")
    assert np.abs(got - want).max() <= 2, np.abs(got - want).max()  # float32 differences, rounded to 8 bits


def _one_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


def test_run_lora_refusals(tiny_model_dir: Path, loras: dict[str, Path], tmp_path: Path,
                           capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import save_file

    out = tmp_path / "x.png"
    run = ["run", str(tiny_model_dir), *ARGS, "-o", str(out)]
    assert main([*run, "--lora", str(tmp_path / "none.safetensors")]) == 2
    assert "does not exist" in _one_line(capsys)
    assert main([*run, "--lora-scale", "0.5"]) == 2
    assert "--lora-scale needs --lora" in _one_line(capsys)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    assert main([*run, "--lora", str(tmp_path / "junk.safetensors")]) == 2
    assert "could not load it as a LoRA" in _one_line(capsys)
    save_file({"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(8, 4)}, str(tmp_path / "other.safetensors"))
    assert main([*run, "--lora", str(tmp_path / "other.safetensors")]) == 2
    err = _one_line(capsys)
    assert "matches a layer" in err or "could not load it as a LoRA" in err, err
    assert not out.exists()


def _plan_folder(tmp_path: Path, onnx: Path, refittable: bool) -> Path:
    from trtkit.builder import metadata as md

    folder = tmp_path / ("refittable" if refittable else "fixed")
    folder.mkdir()
    (folder / "unet.plan").write_bytes(b"not a plan")
    meta = {"format": md.FORMAT, "settings": {"refittable": refittable}, "onnx": {"path": str(onnx)},
            "backend": {"name": "rtx"}, "precision": {"requested": "fp32", "qdq_types": []}}
    (folder / "unet.json").write_text(json.dumps(meta))
    return folder


def test_engines_lora_weights_file(tiny_model_dir: Path, tiny_unet_onnx: Path, loras: dict[str, Path],
                                   tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`trtkit refit -o w.safetensors` writes the weights on the CPU (no TensorRT call), the values refit_weights
    computes (those are checked through onnxruntime in tests/graph/test_lora_weights.py); `trtkit run --engines
    --lora` refuses a plan that is not refittable, and a weights file at another --lora-scale, in one line."""
    from trtkit.builder.refit import refit_weights
    from trtkit.runtime.refit import read_weights

    fixed = _plan_folder(tmp_path, tiny_unet_onnx, refittable=False)
    folder = _plan_folder(tmp_path, tiny_unet_onnx, refittable=True)
    w = tmp_path / "w.safetensors"
    assert main(["refit", str(folder / "unet.plan"), "--lora", str(loras["kohya"]), "--scale", "0.8", "-o", str(w)]) == 0
    got, info = read_weights(w)  # type: ignore[misc]
    want = refit_weights(json.loads((folder / "unet.json").read_text()), loras["kohya"], 0.8).weights
    assert info["scale"] == 0.8 and set(got) == set(want) and len(got) > 0
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert read_weights(loras["diffusers"]) is None  # an adapter is not a weights file

    out = tmp_path / "x.png"
    run = ["run", str(tiny_model_dir), *ARGS, "-o", str(out), "--engines"]
    assert main([*run, str(fixed), "--lora", str(w)]) == 2
    assert "not built with --refittable" in _one_line(capsys)
    assert main([*run, str(folder), "--lora", str(w), "--lora-scale", "0.5"]) == 2
    assert "refit at scale 0.8" in _one_line(capsys)
    for lora in (w, loras["kohya"]):  # the weights file, or the adapter computed at load: then the plan's checks
        assert main([*run, str(folder), "--lora", str(lora)]) == 2
        err = _one_line(capsys)
        assert "is not a TensorRT plan" in err or "need a CUDA GPU" in err, err
    assert not out.exists()
