"""`trtkit.accelerate(pipe)` gives diffusers' own latents for the scheduler configs users build (issue 13).

Each row builds two pipelines the way a user would, one left to diffusers and one given to
`trtkit.accelerate`, from the same tiny random-weight modules (SD 1.5 or SDXL architecture) and two scheduler
instances made the same way, and compares `output_type="latent"` results of the same call with the same
generator seed. The schedulers are made three ways: by hand with every class default left unset (so the
pipeline's in-place config patches and `_use_default_values` are in play: the issue's bug), by hand with every
row option passed, and loaded from a folder written by `save_pretrained` (`from_pretrained`).

Matrix, per scheduler (euler, euler_a, ddim, dpmpp_2m): architecture x build x timestep_spacing
(leading/trailing/linspace) x steps_offset (0/1) x prediction_type (epsilon/v) x clip_sample (DDIM) x
use_karras_sigmas (Euler, DPM-Solver++) x images per prompt (1/2) x size (64x128, 128x64, 64x64) x guidance
(7 / 1, no CFG) x steps. The full product is ~16,000 pipeline pairs; the rows are a pairwise covering design
(`pairwise`: every pair of values of any two factors appears in at least one row, greedy over the product,
deterministic), 12 rows per scheduler, 48 in all. Every option value and the common-option full product are also checked on their
own, without a UNet, in test_schedulers.py; the issue's own case runs here at its 25 steps.

Tolerance: max |ours - diffusers| / max |diffusers| < 1e-4. Both run float32 on the CPU with the same UNet on
the same inputs; what differs is the order of the scheduler's float32 arithmetic (diffusers' torch ops against
the tables' float64 coefficients rounded to float32), ~1e-7 per step, carried through the UNet. Measured
worst case 2.4e-5 (DDIM, trailing, 3 steps: x0 = (x - sqrt(1-a) eps) / sqrt(a) with a = 0.0047 at t = 999
scales float32 rounding by 15), most rows 1e-6 (numbers and command in docs/runtime.md). A wrong table
moves latents by 1e-2 to 1: with the tables rebuilt by from_config (before the fix) 9 tests here fail, at
7e-3 to 1.2e-2 (steps_offset put back to 0) and 0.93 to 1.01 (x0 clipped where diffusers no longer clips).

Threads: torch runs these tiny UNets on one thread (`one_torch_thread`, tests/runtime/conftest.py); two threads on a loaded two-core machine
were 10x slower, and the results are the same.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import trtkit
from trtkit.errors import TrtkitError
from trtkit.runtime.schedulers import SCHEDULERS

TOL = 1e-4
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}  # SD 1.x / SDXL


# --------------------------------------------------------------------------------------------- the design


def pairwise(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Rows covering every pair of values of any two axes (a strength-2 covering array): greedy, each round
    takes the first row of the full product that covers the most pairs not yet covered."""
    names = list(axes)
    full = list(itertools.product(*axes.values()))
    idx = list(itertools.combinations(range(len(names)), 2))
    cover = [frozenset((i, r[i], j, r[j]) for i, j in idx) for r in full]
    todo: set = set().union(*cover)
    rows = []
    while todo:
        k = max(range(len(full)), key=lambda n: len(cover[n] & todo))
        rows.append(dict(zip(names, full[k], strict=True)))
        todo -= cover[k]
    return rows


def scheduler_axes(name: str) -> dict[str, list[Any]]:
    axes: dict[str, list[Any]] = {
        "arch": ["sd15", "sdxl"], "build": ["unset", "explicit", "folder"],
        "timestep_spacing": ["leading", "trailing", "linspace"], "steps_offset": [0, 1],
        "prediction_type": ["epsilon", "v_prediction"], "images": [1, 2], "size": [(64, 128), (128, 64), (64, 64)],
        "guidance": [7.0, 1.0], "steps": [3, 8],
    }
    if name == "ddim":
        axes["clip_sample"] = [True, False]
    if name in ("euler", "dpmpp_2m"):
        axes["use_karras_sigmas"] = [False, True]
    return axes


SCHEDULER_KEYS = ("timestep_spacing", "steps_offset", "prediction_type", "clip_sample", "use_karras_sigmas")
ROWS = [(name, row) for name in SCHEDULERS for row in pairwise(scheduler_axes(name))]


def row_id(v: Any) -> str:
    if isinstance(v, str):
        return v
    short = {"leading": "lead", "trailing": "trail", "linspace": "lin", "epsilon": "eps", "v_prediction": "v"}
    return "-".join(f"{k[:4]}={short.get(x, x) if isinstance(x, str) else x}" for k, x in v.items()
                    if k not in ("size",)) + "-{}x{}".format(*v["size"])


# --------------------------------------------------------------------------------------------- tiny pipelines


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/runtime/conftest.py


def tiny_modules(arch: str, tok_dir: Path) -> dict[str, Any]:
    """Seeded random-weight modules of the SD 1.5 or SDXL architecture, small enough for tens of pipeline runs:
    latents at 1/8 of the image size (a 4-block VAE, never run for latent output), a 2-level UNet."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    te = dict(intermediate_size=16, num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=77,
              vocab_size=1000, projection_dim=16, **ids)
    unet: dict[str, Any] = dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)
    torch.manual_seed(0 if arch == "sd15" else 1)
    out: dict[str, Any] = dict(tokenizer=tok, vae=AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, layers_per_block=1))
    if arch == "sd15":
        out["text_encoder"] = CLIPTextModel(CLIPTextConfig(hidden_size=16, **te))
    else:  # two encoders whose hidden states concatenate to cross_attention_dim; pooled + 6 time ids
        out["text_encoder"] = CLIPTextModel(CLIPTextConfig(hidden_size=8, **te))
        out["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=8, **te))
        out["tokenizer_2"] = tok
        unet.update(addition_embed_type="text_time", addition_time_embed_dim=4, use_linear_projection=True,
                    projection_class_embeddings_input_dim=16 + 6 * 4)
    out["unet"] = UNet2DConditionModel(**unet)
    for m in out.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trtkit.tiny import _write_tokenizer

    tok = tmp_path_factory.mktemp("tok")
    _write_tokenizer(tok)
    return tok


@pytest.fixture(scope="module")
def modules(tok_dir: Path) -> dict[str, dict[str, Any]]:
    return {arch: tiny_modules(arch, tok_dir) for arch in ("sd15", "sdxl")}


def make_scheduler(name: str, row: dict[str, Any]) -> Any:
    """As a user writes it: SD's betas, then the row's options; with build "unset", only those that differ from
    the class default (the others stay in the config's _use_default_values)."""
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
    kw = {k: row[k] for k in SCHEDULER_KEYS if k in row}
    if row.get("build", "unset") == "unset":
        kw = {k: v for k, v in kw.items() if defaults.get(k) != v}
    return cls(**SD_BETAS, **kw)


def make_pipeline(arch: str, mods: dict[str, Any], scheduler: Any) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if arch == "sd15":
        p = StableDiffusionPipeline(scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False, **mods)
    else:
        p = StableDiffusionXLPipeline(scheduler=scheduler, **mods)
    p.set_progress_bar_config(disable=True)
    return p


def pipeline_pair(name: str, row: dict[str, Any], mods: dict[str, Any], tmp: Path) -> tuple[Any, Any]:
    """(for diffusers, for trtkit): built alike, sharing the modules; or both loaded from one saved folder."""
    arch = row["arch"]
    if row["build"] != "folder":
        return tuple(make_pipeline(arch, mods, make_scheduler(name, row)) for _ in range(2))  # type: ignore[return-value]
    from diffusers import DiffusionPipeline

    make_pipeline(arch, mods, make_scheduler(name, {**row, "build": "unset"})).save_pretrained(str(tmp))
    pair = tuple(DiffusionPipeline.from_pretrained(str(tmp)) for _ in range(2))
    for p in pair:
        p.set_progress_bar_config(disable=True)
    return pair  # type: ignore[return-value]


def latents(pipe: Any, row: dict[str, Any], seed: int = 0) -> np.ndarray:
    h, w = row["size"]
    out = pipe("a red cube", negative_prompt="blurry", num_inference_steps=row["steps"], guidance_scale=row["guidance"],
               height=h, width=w, num_images_per_prompt=row["images"], generator=torch.Generator("cpu").manual_seed(seed),
               output_type="latent").images
    return out.float().cpu().numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# --------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("name,row", ROWS, ids=row_id)
def test_accelerate_matches_diffusers(modules, tmp_path: Path, name: str, row: dict) -> None:  # type: ignore[no-untyped-def]
    ref, acc = pipeline_pair(name, row, modules[row["arch"]], tmp_path)
    want = latents(ref, row)
    got = latents(trtkit.accelerate(acc), row)
    h, w = row["size"]
    assert got.shape == want.shape == (row["images"], 4, h // 8, w // 8)
    assert acc.scheduler.config == ref.scheduler.config  # accelerate changed nothing diffusers reads
    err = rel(got, want)
    print(f"parity cpu {name} {row_id(row)} {err:.2e}")  # with -s: the numbers docs/runtime.md quotes
    assert np.isfinite(got).all() and err < TOL, f"{name} {row}: rel err {err:.2e}"


def test_design_covers_every_pair() -> None:
    for name in SCHEDULERS:
        axes = scheduler_axes(name)
        rows = [r for n, r in ROWS if n == name]
        for (a, va), (b, vb) in itertools.combinations(axes.items(), 2):
            seen = {(r[a], r[b]) for r in rows}
            assert seen == set(itertools.product(va, vb)), f"{name}: {a} x {b}"


ISSUE_DDIM = dict(steps_offset=1, timestep_spacing="trailing")


def test_issue_13_case(modules) -> None:  # type: ignore[no-untyped-def]
    """The reported case: SD 1.5 architecture, DDIMScheduler(SD betas, steps_offset=1, timestep_spacing=
    "trailing") with clip_sample left unset (the pipeline patches it to False), 25 steps, guidance 7. It was
    0.97 (1.01 on this tiny model) before the tables followed the instance."""
    from diffusers import DDIMScheduler

    row = dict(arch="sd15", steps=25, guidance=7.0, images=1, size=(64, 64))
    ref, acc = (make_pipeline("sd15", modules["sd15"], DDIMScheduler(**SD_BETAS, **ISSUE_DDIM)) for _ in range(2))
    assert ref.scheduler.config.clip_sample is False and "clip_sample" in ref.scheduler.config._use_default_values
    want = latents(ref, row)
    err = rel(latents(trtkit.accelerate(acc), row), want)
    print(f"parity cpu issue-13 {err:.2e}")
    assert err < TOL, f"rel err {err:.2e}"


def test_unsupported_config_refused_or_falls_back(modules, caplog) -> None:  # type: ignore[no-untyped-def]
    """A config the tables cannot reproduce: a one-line error at accelerate(); set after accelerate(), a
    warning and diffusers' own loop (the same latents as diffusers), never a different image."""
    from diffusers import DDIMScheduler, PNDMScheduler

    row = dict(steps=3, guidance=7.0, images=1, size=(64, 64))
    thresh = dict(**SD_BETAS, thresholding=True, sample_max_value=0.8)
    with pytest.raises(TrtkitError, match="thresholding") as e:
        trtkit.accelerate(make_pipeline("sd15", modules["sd15"], DDIMScheduler(**thresh)))
    assert "\n" not in str(e.value)
    ref = make_pipeline("sd15", modules["sd15"], DDIMScheduler(**thresh))
    acc = trtkit.accelerate(make_pipeline("sd15", modules["sd15"], DDIMScheduler(**SD_BETAS)))
    for sch in (DDIMScheduler(**thresh), PNDMScheduler(**SD_BETAS, skip_prk_steps=True)):
        ref.scheduler, acc.scheduler = sch, sch.from_config(sch.config)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            got = latents(acc, row)
        assert "running diffusers' own loop" in caplog.text and type(sch).__name__ in caplog.text
        np.testing.assert_array_equal(got, latents(ref, row))


# --------------------------------------------------------------------------------------------- the CLI path


@pytest.fixture(scope="module")
def sd15_folder(modules, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved SD 1.5-architecture folder whose scheduler_config.json names only what its author set, as Hub
    folders do: the issue's DDIM, clip_sample unset (the pipeline patches it to False when it loads)."""
    from diffusers import DDIMScheduler

    out = tmp_path_factory.mktemp("sd15") / "model"
    make_pipeline("sd15", modules["sd15"], DDIMScheduler(**SD_BETAS, **ISSUE_DDIM)).save_pretrained(str(out))
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", **SD_BETAS, **ISSUE_DDIM}))
    return out


@pytest.mark.parametrize("scheduler", [None, *SCHEDULERS])
def test_cli_pipeline_matches_diffusers(sd15_folder: Path, scheduler: str | None) -> None:
    """`trtkit run MODEL --scheduler S` (runtime.pipeline.Pipeline) against diffusers loading the same folder and
    switching with its documented idiom `pipe.scheduler = Cls.from_config(pipe.scheduler.config)` (no switch
    without --scheduler, or when S is the folder's own kind). diffusers gets generator=manual_seed(5), as a user
    compares with --seed 5 (euler_a was 0.51 away while trtkit run drew its noise from a second generator)."""
    import diffusers

    from trtkit.runtime.pipeline import Pipeline, RunConfig

    p = Pipeline(sd15_folder, device="cpu", cuda_graph=False)
    cfg = RunConfig(model_dir=sd15_folder, prompt="a red cube", negative_prompt="blurry", steps=6, guidance=7.0,
                    scheduler=scheduler, seed=5, height=64, width=128, device="cpu")
    got = p(cfg).latents
    ref = diffusers.DiffusionPipeline.from_pretrained(str(sd15_folder))
    ref.set_progress_bar_config(disable=True)
    if scheduler not in (None, "ddim"):
        ref.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(ref.scheduler.config)
    want = ref("a red cube", negative_prompt="blurry", num_inference_steps=6, guidance_scale=7.0, height=64,
               width=128, generator=torch.Generator("cpu").manual_seed(5),  # --seed 5, as a user compares
               output_type="latent").images.numpy()
    err = rel(got, want)
    print(f"parity cli {scheduler} {err:.2e}")
    assert err < TOL, f"{scheduler}: rel err {err:.2e}"


def test_cli_unsupported_folder_scheduler_is_one_line(sd15_folder: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    import shutil

    from diffusers import PNDMScheduler

    from trtkit.cli import main

    folder = tmp_path / "pndm"
    shutil.copytree(sd15_folder, folder)
    PNDMScheduler(**SD_BETAS, skip_prk_steps=True).save_pretrained(str(folder / "scheduler"))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]  # the class from_pretrained builds
    (folder / "model_index.json").write_text(json.dumps(index))
    rc = main(["run", str(folder), "--prompt", "x", "--steps", "2", "--device", "cpu", "--no-cuda-graph",
               "-o", str(tmp_path / "a.png")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "PNDMScheduler has no device tables" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a.png").exists()
    rc = main(["run", str(folder), "--prompt", "x", "--steps", "2", "--device", "cpu", "--no-cuda-graph",
               "--height", "64", "--width", "64", "--scheduler", "ddim", "-o", str(tmp_path / "a.png")])
    assert rc == 0 and (tmp_path / "a.png").is_file()


# --------------------------------------------------------------------------------------------- GPU


GPU_DTYPES = {"fp32": (torch.float32, "plain", 1e-4), "fp16": (torch.float16, "tuned", 2e-2)}


@pytest.fixture
def _no_tf32():  # type: ignore[no-untyped-def]
    """fp32 on the GPU as on the CPU: TF32 convolutions would round the UNet's inputs differently per loop."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(GPU_DTYPES))
@pytest.mark.parametrize("name,row", ROWS, ids=row_id)
def test_gpu_graph_eager_and_diffusers(tok_dir: Path, tmp_path: Path, _no_tf32, name: str, row: dict,  # type: ignore[no-untyped-def]
                                       dtype: str) -> None:
    """The same rows on the GPU: the CUDA graph against the eager device loop of the same executor (same
    kernels in the same order: bit-identical, as test_graph_runner states), and against diffusers' own loop over
    the same UNet. fp32, plain kernels, TF32 off: 1e-4, as on the CPU. fp16 with the tuned kernels (what users
    get): 2e-2 (DDIM 1e-1), as test_accelerate.test_accelerate_on_gpu_fp16 states: diffusers keeps fp16 latents
    between steps, the runtime fp32; there the reference is diffusers' loop after accelerate() gave the UNet its
    tuned kernels, so that only the loops differ. Fresh modules per row: the tuned kernels change the UNet."""
    from trtkit.runtime.graph_runner import LoopRunner

    torch_dtype, kernels, tol = GPU_DTYPES[dtype]
    if dtype == "fp16" and name == "ddim":
        tol = 1e-1
    ref, acc = (p.to("cuda", torch_dtype) for p in
                pipeline_pair(name, row, tiny_modules(row["arch"], tok_dir), tmp_path))
    rt = trtkit.accelerate(acc, cuda_graph=True, kernels=kernels)._trtkit
    graph = latents(acc, row)
    again = latents(acc, row)  # a replay of the captured graph
    assert rt.runner.captures == 1
    rt.runner = LoopRunner(rt.executor, device="cuda", use_graph=False)
    eager = latents(acc, row)
    want = latents(functools.partial(rt.original_call, acc) if kernels == "tuned" else ref, row)
    np.testing.assert_array_equal(graph, eager)
    np.testing.assert_array_equal(again, graph)
    err = rel(graph, want)
    print(f"parity gpu-{dtype} {name} {row_id(row)} {err:.2e}")
    assert np.isfinite(graph).all() and err < tol, f"{name} {dtype} {row}: rel err {err:.2e}"
