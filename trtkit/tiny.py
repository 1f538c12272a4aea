"""The embedded default model: a small SDXL-architecture pipeline with seeded random weights.

It is built from `data/tiny-sdxl.json` and saved with `save_pretrained`, so that everything after it
(export, calibration, the runtime) goes through the real diffusers loading code.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from trtkit._files import atomic_dir
from trtkit._quiet import quiet_loading


def tiny_config() -> dict[str, Any]:
    text = resources.files("trtkit").joinpath("data/tiny-sdxl.json").read_text()
    cfg = json.loads(text)
    cfg.pop("_comment", None)
    return cfg


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table; written here because transformers moved it between releases."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _write_tokenizer(folder: Path) -> None:
    """A character-level CLIP BPE tokenizer (no merges): real CLIPTokenizer code, no download."""
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def clip_tokenizer(folder: Path) -> tuple[Any, dict[str, int]]:
    """The character-level CLIP tokenizer, written to `folder` and loaded, and the special-token ids its text
    encoders' configs take."""
    from transformers import CLIPTokenizer

    _write_tokenizer(folder)
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    return tok, dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def save_into(pipe: Any, folder: Path) -> None:
    """Save `pipe` as a diffusers folder whose files sit directly in `folder` (the atomic_dir being built):
    save_pretrained wants a fresh folder, so it writes one level down and the entries move up."""
    with quiet_loading():
        pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    for p in (folder / "pipe").iterdir():
        p.rename(folder / p.name)
    (folder / "pipe").rmdir()


def make_tiny_pipeline(out_dir: Path | str, seed: int = 0) -> Path:
    """Write a tiny SDXL pipeline folder (diffusers layout) with weights drawn from `seed`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = tiny_config()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tok_dir = tmp / "_tok"
        tokenizer, ids = clip_tokenizer(tok_dir)
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"], **ids))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"], **ids))
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer,
            unet=unet, scheduler=EulerDiscreteScheduler(**cfg["scheduler"]),
        )
        save_into(pipe, tmp)
        import shutil

        shutil.rmtree(tok_dir)
    return out_dir
