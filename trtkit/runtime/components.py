"""Which pipeline components run as TensorRT engines, what the pipeline feeds them, and whether an
engine's I/O fits: plain functions over EngineDesc (plan.py) and names, used by pipeline.py.

* Engines replace torch modules: those modules are never loaded to the GPU (finding 6); only their configs
  and the tokenizers are used.
* Text encoders are called ONCE per prompt: [negative; prompt] at batch 2 with classifier-free guidance,
  [prompt] at batch 1 without (finding 1); the text-encoder profiles cover batch 1..2*images (profiles.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from trtkit.runtime.plan import EngineDesc, EngineError, Shape, pick_profile

ENGINE_NAMES = ("unet", "text_encoder", "text_encoder_2", "vae_decoder")
# engine file -> the diffusers module it replaces
REPLACES = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2",
            "vae_decoder": "vae"}
TORCH_MODULES = ("unet", "text_encoder", "text_encoder_2", "vae")
FLOATS = ("float32", "float16", "bfloat16")


def engine_files(engines: Path | str | None) -> list[str]:
    """Engine names given by `--engines`: a plan file is the UNet; a folder gives each `<name>.plan` it holds."""
    if engines is None:
        return []
    p = Path(engines)
    if p.is_file():
        return ["unet"]
    return [n for n in ENGINE_NAMES if (p / f"{n}.plan").is_file()]


def pipeline_modules(model_index: Mapping[str, object]) -> list[str]:
    """The modules a diffusers folder has (model_index.json entries naming a class)."""
    return [k for k, v in model_index.items() if isinstance(v, list) and len(v) == 2 and v[1] is not None]


def engine_modules(engines: Iterable[str], modules: Iterable[str]) -> set[str]:
    """The diffusers modules that engines take over: the UNet, the VAE (a decoder plan), and the text encoders
    only when every text encoder of the pipeline has a plan (else torch encodes the prompt with all of them)."""
    taken = {REPLACES[e] for e in engines if e in REPLACES}
    text = [m for m in ("text_encoder", "text_encoder_2") if m in set(modules)]
    if not all(m in taken for m in text):
        taken -= set(text)
    return taken


def modules_on_device(present: Iterable[str], taken: Iterable[str]) -> list[str]:
    """The torch modules the runtime moves to the GPU: the ones it uses (TORCH_MODULES) that no engine took.
    The rest stay on the CPU (a replaced VAE: only its config is read) or are never loaded."""
    return [m for m in TORCH_MODULES if m in set(present) and m not in set(taken)]


def modules_not_loaded(taken: Iterable[str]) -> list[str]:
    """Modules whose weights are not loaded at all (their configs come from their folders): the UNet and the
    text encoders that engines took. A replaced VAE is loaded on the CPU (small; its config is read)."""
    return [m for m in ("unet", "text_encoder", "text_encoder_2") if m in set(taken)]


def encoder_texts(prompt: str, negative: str, cfg: bool, zero_negative: bool) -> list[str]:
    """The texts of the one text-encoder call: [negative, prompt] with guidance (the UNet's [uncond; cond]
    order), [prompt] without or when the negative embedding is zeros (SDXL's force_zeros_for_empty_prompt)."""
    return [negative, prompt] if cfg and not zero_negative else [prompt]


def encoder_shapes(texts: list[str], tokens: int) -> dict[str, Shape]:
    return {"input_ids": (len(texts), tokens)}


def check_encoder(desc: EngineDesc, shapes: Mapping[str, Shape], outputs: Iterable[str]) -> None:
    """A text encoder engine: takes int input_ids of the call's batch (some profile covers it), gives `outputs`."""
    if "input_ids" in desc.inputs and desc.tensor("input_ids").dtype not in ("int32", "int64"):
        raise EngineError(f"{desc.name}: input_ids is {desc.tensor('input_ids').dtype}, expected int32 or int64")
    missing = [o for o in outputs if o not in desc.outputs]
    if missing:
        raise EngineError(f"{desc.name} has no output {', '.join(missing)}", hint=f"outputs: {', '.join(desc.outputs)}")
    _check_floats(desc, list(outputs))
    pick_profile(desc, shapes)


def check_unet(desc: EngineDesc, sdxl: bool) -> None:
    """A UNet engine the loop can drive: its input/output names, one float I/O dtype, float32 timestep."""
    want = ["sample", "timestep", "encoder_hidden_states"] + (["text_embeds", "time_ids"] if sdxl else [])
    if sorted(desc.inputs) != sorted(want) or desc.outputs != ["noise_pred"]:
        raise EngineError(f"{desc.name}: I/O {', '.join(desc.inputs)} -> {', '.join(desc.outputs)} is not the "
                          f"pipeline's UNet ({', '.join(want)} -> noise_pred)")
    io = {desc.tensor(n).dtype for n in want + ["noise_pred"] if n != "timestep"}
    if len(io) != 1 or next(iter(io)) not in FLOATS:
        raise EngineError(f"{desc.name}: UNet I/O dtypes {', '.join(sorted(io))}; the loop needs one of "
                          f"{', '.join(FLOATS)} for sample, conditioning and noise_pred")
    if desc.tensor("timestep").dtype != "float32":
        raise EngineError(f"{desc.name}: timestep is {desc.tensor('timestep').dtype}, the loop feeds float32")


def check_vae(desc: EngineDesc, latent: Shape) -> None:
    if desc.inputs != ["latent"] or "images" not in desc.outputs:
        raise EngineError(f"{desc.name}: I/O {', '.join(desc.inputs)} -> {', '.join(desc.outputs)} is not the "
                          "pipeline's VAE decoder (latent -> images)")
    _check_floats(desc, ["latent", "images"])
    pick_profile(desc, {"latent": latent})


def _check_floats(desc: EngineDesc, names: list[str]) -> None:
    bad = [f"{n} {desc.tensor(n).dtype}" for n in names if desc.tensor(n).dtype not in FLOATS + ("float8_e4m3fn",)]
    if bad:
        raise EngineError(f"{desc.name}: {', '.join(bad)}; expected floating-point tensors")
