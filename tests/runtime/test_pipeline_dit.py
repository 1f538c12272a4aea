"""`trtkit run` / `trtkit bench` on tiny FLUX and SD3 folders: the image and latents are those of
`trtkit.accelerate(pipe)` with a CPU generator seeded the same (float32 on the CPU: equal), and what the
runtime does not do for DiT folders (--scheduler, --lora) and a missing or unusable transformer engine are one
line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import trtkit
from trtkit.cli import main
from trtkit.runtime.pipeline import RunConfig, run
from trtkit.runtime.pipeline_dit import is_dit_folder


@pytest.fixture(scope="module")
def dit_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from trtkit.tiny_dit import make_tiny_dit_pipeline

    root = tmp_path_factory.mktemp("dit")
    return {f: make_tiny_dit_pipeline(f, root / f, seed=0) for f in ("flux", "sd3")}


@pytest.mark.parametrize("family,guidance", [("flux", 3.5), ("sd3", 5.0)])
def test_run_equals_accelerate(dit_dirs: dict[str, Path], family: str, guidance: float, tmp_path: Path,
                               one_torch_thread: None) -> None:
    from diffusers import DiffusionPipeline

    assert is_dit_folder(dit_dirs[family])
    neg = "blurry" if family == "sd3" else ""  # FLUX.1 takes none (refused below)
    cfg = RunConfig(model_dir=dit_dirs[family], prompt="a cat", negative_prompt=neg, steps=3, guidance=guidance,
                    seed=7, height=64, width=96, device="cpu")
    res = run(cfg, tmp_path / "a.png")
    assert res.path is not None and res.path.is_file() and res.timings_ms["denoise"] > 0
    pipe = trtkit.accelerate(DiffusionPipeline.from_pretrained(dit_dirs[family]))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a cat", num_inference_steps=3, guidance_scale=guidance, height=64, width=96)
    if family == "sd3":
        kw["negative_prompt"] = "blurry"
    lat = pipe(**kw, generator=torch.Generator().manual_seed(7), output_type="latent").images
    img = pipe(**kw, generator=torch.Generator().manual_seed(7)).images[0]
    assert np.abs(res.latents - lat.numpy()).max() <= 1e-6 * np.abs(lat.numpy()).max()
    assert np.array_equal(np.asarray(res.image), np.asarray(img))


def test_cli_run_and_bench(dit_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                           one_torch_thread: None) -> None:
    out = tmp_path / "f.png"
    rc = main(["run", str(dit_dirs["flux"]), "--prompt", "a cat", "--steps", "2", "--guidance", "3.5", "--height",
               "64", "--width", "64", "--device", "cpu", "-o", str(out), "--json"])
    assert rc == 0 and out.is_file()
    assert json.loads(capsys.readouterr().out)["executor"] == "torch"
    rc = main(["bench", str(dit_dirs["sd3"]), "--steps", "2", "--height", "64", "--width", "64", "--device", "cpu",
               "--warmup", "0", "--repeats", "1", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["steps"] == 2


@pytest.mark.parametrize("args,match", [(["--engines", "{tmp}"], "has no transformer.plan"),
                                        (["--engines", "{tmp}/transformer.plan"], "TensorRT engines need a CUDA GPU"),
                                        (["--engines", "{tmp}", "--compile"], "--compile is for the torch"),
                                        (["--engines", "{tmp}", "--lora", "{tmp}/unet.plan"], "--lora is for SD")])
def test_dit_refusals_are_one_line(dit_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                   args: list[str], match: str) -> None:
    (tmp_path / "unet.plan").write_bytes(b"x")  # a UNet plan is not a transformer's
    if "transformer.plan" in " ".join(args) or "--compile" in args:  # found; refused before it is read
        (tmp_path / "transformer.plan").write_bytes(b"x")
    out = tmp_path / "b.png"
    rc = main(["run", str(dit_dirs["sd3"]), "--prompt", "x", "--steps", "1", "--device", "cpu", "-o", str(out),
               *[a.format(tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and match in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.gpu
def test_run_on_gpu_equals_accelerate(dit_dirs: dict[str, Path], tmp_path: Path) -> None:
    """bf16, one CUDA graph: `trtkit run` and an accelerated script draw the same latents (CPU generator) and run
    the same captured loop, so their latents are equal."""
    from diffusers import DiffusionPipeline

    cfg = RunConfig(model_dir=dit_dirs["flux"], prompt="a cat", steps=4, guidance=3.5, seed=3, height=256,
                    width=256, device="cuda")
    res = run(cfg, tmp_path / "g.png")
    assert res.cuda_graph and res.executor == "torch"
    pipe = trtkit.accelerate(DiffusionPipeline.from_pretrained(dit_dirs["flux"], torch_dtype=torch.bfloat16)
                             .to("cuda"))
    lat = pipe("a cat", num_inference_steps=4, guidance_scale=3.5, height=256, width=256,
               generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert np.array_equal(res.latents, pipe._trtkit.runner.result())
    assert lat.shape == (1, 256, 16)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_cli_image_is_plain_diffusers_with_its_defaults(dit_dirs: dict[str, Path], family: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture, one_torch_thread: None) -> None:
    """`trtkit run` with --guidance left unset uses the pipeline's own default (FLUX.1 3.5, SD3 7.0; it was the
    SD CFG scale 7.5 for every folder) and writes the PNG of plain diffusers' call with that seed; its line names
    the transformer (it said "UNet")."""
    from diffusers import DiffusionPipeline
    from PIL import Image

    out = tmp_path / "c.png"
    rc = main(["run", str(dit_dirs[family]), "--prompt", "a cat", "--steps", "2", "--height", "32", "--width", "48",
               "--seed", "3", "--device", "cpu", "-o", str(out)])
    said = capsys.readouterr()
    assert rc == 0 and "(torch transformer, eager loop" in said.out, said.err
    pipe = DiffusionPipeline.from_pretrained(dit_dirs[family])
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a cat", num_inference_steps=2, height=32, width=48, generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(ref))


@pytest.mark.parametrize("family,args,match", [
    ("sd3", ["--scheduler", "euler"], "FlowMatchEulerDiscreteScheduler"),
    ("sd3", ["--height", "72"], "multiples of 16"),  # diffusers' SD3 raises (was a traceback)
    ("flux", ["--width", "40"], "multiples of 16"),  # diffusers' FLUX rounds down to 32 (was a smaller image)
    ("flux", ["--negative-prompt", "blurry"], "--negative-prompt"),  # FLUX.1 ignores it (was silently dropped)
])
def test_cli_dit_inputs_refused_in_one_line(dit_dirs: dict[str, Path], family: str, args: list[str], match: str,
                                            tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """...before the pipeline loads (a FLUX.1-dev takes minutes): here its transformer weights are missing."""
    import shutil

    folder = shutil.copytree(dit_dirs[family], tmp_path / family, ignore=shutil.ignore_patterns("*.safetensors"))
    out = tmp_path / "d.png"
    rc = main(["run", str(folder), "--prompt", "x", "--steps", "1", "--height", "32", "--width", "32",
               "--device", "cpu", "-o", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and match in err and len(err.splitlines()) == 1, err
    assert not out.exists()
