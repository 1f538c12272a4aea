"""LoRA through `trtkit.accelerate`: the same latents as diffusers after loading, switching, rescaling and fusing
adapters (tiny SD 1.5 and SDXL architectures, random weights, a random LoRA in diffusers and kohya key styles),
and the plain function that tells the loop runner when a captured graph is stale (runtime/lora.py)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from test_scheduler_parity import make_pipeline, tiny_modules  # noqa: E402  (tests/runtime is on sys.path)

import trtkit  # noqa: E402
from trtkit.runtime.lora import graph_state, wrapped_fused_attentions  # noqa: E402
from trtkit.tiny_lora import random_lora_state, save_diffusers, save_kohya  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/runtime/conftest.py


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trtkit.tiny import _write_tokenizer

    tok = tmp_path_factory.mktemp("tok")
    _write_tokenizer(tok)
    return tok


def _pipeline_cls(arch: str) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionPipeline if arch == "sd15" else StableDiffusionXLPipeline


@pytest.fixture(scope="module")
def loras(tok_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """arch -> (adapter "a" in diffusers key style, alpha 2 of rank 4; adapter "b" in kohya key style, alpha 4)."""
    out = {}
    for arch in ("sd15", "sdxl"):
        unet = tiny_modules(arch, tok_dir)["unet"]
        d = tmp_path_factory.mktemp(f"lora_{arch}")
        a = save_diffusers(random_lora_state(unet, seed=1), d, "a.safetensors", _pipeline_cls(arch), alpha=2)
        b = save_kohya(random_lora_state(unet, seed=2), d / "b_kohya.safetensors", alpha=4)
        out[arch] = (a, b)
    return out


def _scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def _latents(f: Any, device: str = "cpu") -> np.ndarray:
    """Two images per prompt, non-square."""
    out = f("a red cube", negative_prompt="blurry", num_inference_steps=3, guidance_scale=6.0, height=64, width=128,
            num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images
    return out.float().cpu().numpy()


def _err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _load(pipe: Any, files: tuple[Path, Path]) -> None:
    pipe.load_lora_weights(str(files[0]), adapter_name="a")
    pipe.load_lora_weights(str(files[1]), adapter_name="b")


# What users do between calls, in order; each step then compares trtkit with diffusers.
STEPS: list[tuple[str, Any]] = [
    ("a", lambda p: p.set_adapters(["a"])),
    ("a+b scaled", lambda p: p.set_adapters(["a", "b"], adapter_weights=[0.8, -0.5])),
    ("b x1.3", lambda p: p.set_adapters(["b"], adapter_weights=[1.3])),
    ("a fused x0.7", lambda p: (p.set_adapters(["a"]), p.fuse_lora(lora_scale=0.7))),
    ("b fused (a unfused first)", lambda p: (p.unfuse_lora(), p.set_adapters(["b"]), p.fuse_lora())),
    ("unfused, disabled", lambda p: (p.unfuse_lora(), p.disable_lora())),
    ("enabled again", lambda p: p.enable_lora()),
    ("a x0.6 after b deleted", lambda p: (p.delete_adapters("b"), p.set_adapters(["a"], adapter_weights=[0.6]))),
]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lora_parity_after_switching(arch: str, tok_dir: Path, loras: dict[str, tuple[Path, Path]]) -> None:
    pipe = make_pipeline(arch, tiny_modules(arch, tok_dir), _scheduler())
    base = _latents(pipe)
    _load(pipe, loras[arch])
    trtkit.accelerate(pipe)
    diffusers_call = functools.partial(pipe._trtkit.original_call, pipe)
    for what, change in STEPS:
        change(pipe)
        want = _latents(diffusers_call)
        got = _latents(pipe)
        assert _err(got, want) < 1e-4, f"{arch} {what}: {_err(got, want):.2e}"
        if what != "unfused, disabled":  # the LoRA changes the result: the comparison is not vacuous
            assert _err(want, base) > 5e-3, f"{arch} {what}: the LoRA changes nothing"


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lora_scale_in_cross_attention_kwargs(arch: str, tok_dir: Path, loras: dict[str, tuple[Path, Path]],
                                              caplog: pytest.LogCaptureFixture) -> None:
    """`pipe(..., cross_attention_kwargs={"scale": s})`, diffusers' per-call LoRA strength, runs on the runtime (no
    fallback) with diffusers' latents, and leaves the PEFT scales as they were (the same graph key after the call)."""
    pipe = make_pipeline(arch, tiny_modules(arch, tok_dir), _scheduler())
    _load(pipe, loras[arch])
    trtkit.accelerate(pipe)
    diffusers_call = functools.partial(pipe._trtkit.original_call, pipe)
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])
    full = _latents(diffusers_call)
    for s in (0.5, 0.0, 1.3):
        want = _latents(functools.partial(diffusers_call, cross_attention_kwargs={"scale": s}))
        pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])  # diffusers' call with scale 0 resets them
        key = graph_state(pipe.unet)
        caplog.clear()
        got = _latents(functools.partial(pipe, cross_attention_kwargs={"scale": s}))
        assert "own loop" not in caplog.text, caplog.text
        assert _err(got, want) < 1e-4, f"{arch} scale {s}: {_err(got, want):.2e}"
        assert _err(want, full) > 5e-3, f"{arch} scale {s} changes nothing"
        assert graph_state(pipe.unet) == key


def test_graph_state_tells_stale_from_in_place(tok_dir: Path, loras: dict[str, tuple[Path, Path]]) -> None:
    """The key the runner compares: new after switching or rescaling unmerged adapters, the same after swapping
    which adapter is fused (diffusers fuses in place: the addresses stay, the forward is base(x) either way)."""
    pipe = make_pipeline("sd15", tiny_modules("sd15", tok_dir), _scheduler())
    k0 = graph_state(pipe.unet)
    _load(pipe, loras["sd15"])
    keys = {"loaded": graph_state(pipe.unet)}
    pipe.set_adapters(["a"])
    keys["a"] = graph_state(pipe.unet)
    pipe.set_adapters(["a"], adapter_weights=[0.5])
    keys["a/2"] = graph_state(pipe.unet)
    pipe.set_adapters(["b"])
    keys["b"] = graph_state(pipe.unet)
    assert len({k0, *keys.values()}) == 4 and keys["loaded"] == keys["b"]  # the last one loaded is active
    pipe.set_adapters(["a"])
    assert graph_state(pipe.unet) == keys["a"]  # back to the same state: the same key
    pipe.fuse_lora()
    fused_a = graph_state(pipe.unet)
    pipe.unfuse_lora()
    pipe.set_adapters(["b"], adapter_weights=[0.3])
    pipe.fuse_lora()
    assert graph_state(pipe.unet) == fused_a
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert graph_state(pipe.unet) != fused_a


@pytest.fixture
def cpu_fuse_qkv(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate() on the CPU with the GPU preset's fused q/k/v (the class swaps need a GPU's triton)."""
    import trtkit.runtime.pipeline as pipeline_mod

    monkeypatch.setattr(pipeline_mod, "kernel_options", lambda *a, **k: {"fuse_qkv": True})


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_fuse_qkv_with_lora_loaded_before_or_after(arch: str, tok_dir: Path, loras: dict[str, tuple[Path, Path]],
                                                   cpu_fuse_qkv: None) -> None:
    """Fused q/k/v hold no LoRA: attentions with LoRA on q/k/v run unfused, whether the LoRA came before
    accelerate() or after it; the reference is diffusers on an unfused copy of the same modules."""
    mods = tiny_modules(arch, tok_dir)
    ref = make_pipeline(arch, copy.deepcopy(mods), _scheduler())
    _load(ref, loras[arch])
    ref.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])
    want = _latents(ref)

    before = make_pipeline(arch, copy.deepcopy(mods), _scheduler())
    _load(before, loras[arch])
    before.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])
    trtkit.accelerate(before)
    assert _err(_latents(before), want) < 1e-4
    assert not wrapped_fused_attentions(before.unet)

    after = make_pipeline(arch, mods, _scheduler())
    trtkit.accelerate(after)
    assert any(getattr(m, "fused_projections", False) for m in after.unet.modules())
    _load(after, loras[arch])
    after.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])
    # first a call that falls back to diffusers' own loop (a callback): it must not run the stale fused q/k/v either
    fallback = _latents(functools.partial(after, callback_on_step_end=lambda p, i, t, kw: kw))
    assert _err(fallback, want) < 1e-4
    assert _err(_latents(after), want) < 1e-4
    assert not wrapped_fused_attentions(after.unet)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lora_switching_on_gpu_tuned(arch: str, tok_dir: Path, loras: dict[str, tuple[Path, Path]]) -> None:
    """The tuned kernels (channels-last, class swaps, fused q/k/v) and one captured loop graph, fp16: after every
    change of STEPS the image matches diffusers' own loop on an untouched fp16 copy of the same pipeline with the
    same change. A re-capture happens where the graph is stale (adapters or scales of unmerged LoRA) and not when
    a fused adapter is swapped in place. Tolerance as test_accelerate_on_gpu_fp16 (fp16 latents in diffusers)."""
    mods = tiny_modules(arch, tok_dir)
    ref = make_pipeline(arch, copy.deepcopy(mods), _scheduler()).to("cuda", torch.float16)
    pipe = make_pipeline(arch, mods, _scheduler()).to("cuda", torch.float16)
    _load(ref, loras[arch])
    _load(pipe, loras[arch])
    trtkit.accelerate(pipe)
    runner = pipe._trtkit.runner
    for what, change in STEPS:
        change(ref)
        change(pipe)
        before = runner.captures
        got, want = _latents(pipe), _latents(ref)
        assert _err(got, want) < 2e-2, f"{arch} {what}: {_err(got, want):.2e}"
        if what == "b fused (a unfused first)":
            assert runner.captures == before, "swapping a fused adapter in place re-captured"
        if what in ("a+b scaled", "b x1.3"):
            assert runner.captures == before + 1
    # the per-call scale of unfused adapters: a new scale re-captures once, the same scale again does not
    pipe.set_adapters(["a"])
    ref.set_adapters(["a"])
    for s, new_capture in ((0.5, True), (0.5, False), (1.0, True)):
        before = runner.captures
        got = _latents(functools.partial(pipe, cross_attention_kwargs={"scale": s}))
        want = _latents(functools.partial(ref, cross_attention_kwargs={"scale": s}))
        assert _err(got, want) < 2e-2, f"{arch} scale {s}: {_err(got, want):.2e}"
        assert runner.captures == before + int(new_capture), f"scale {s}: {runner.captures - before} captures"
