"""Tiny DiT pipelines: FLUX.1-dev and SD3.5-medium architectures with seeded random weights.

Built from `data/tiny-flux.json` / `data/tiny-sd3.json` and saved with `save_pretrained`, so that export,
quantization and the build read them through the real diffusers loading code, as for the tiny SDXL
(trtkit/tiny.py). Tokenizers are made here (no download): CLIP as in tiny.py, and a character-level
T5 (Unigram) tokenizer written with the `tokenizers` library, since a real T5 one needs a download.
"""

from __future__ import annotations

import json
import shutil
import string
from importlib import resources
from pathlib import Path
from typing import Any

from trtkit._files import atomic_dir
from trtkit.errors import TrtkitError

FAMILIES = ("flux", "sd3")


def tiny_dit_config(family: str) -> dict[str, Any]:
    if family not in FAMILIES:
        raise TrtkitError(f"unknown tiny DiT family {family!r}; expected one of {', '.join(FAMILIES)}")
    cfg = json.loads(resources.files("trtkit").joinpath(f"data/tiny-{family}.json").read_text())
    cfg.pop("_comment", None)
    return cfg


def _t5_tokenizer(max_length: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]  # lazy attribute

    chars = list(string.printable[:95])
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def make_tiny_dit_pipeline(family: str, out_dir: Path | str, seed: int = 0) -> Path:
    """Write a tiny FLUX or SD3 pipeline folder (diffusers layout) with weights drawn from `seed`."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from trtkit.tiny import clip_tokenizer, save_into

    cfg = tiny_dit_config(family)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tok_dir = tmp / "_tok"
        clip_tok, ids = clip_tokenizer(tok_dir)
        torch.manual_seed(seed)
        vae = AutoencoderKL(**cfg["vae"])
        scheduler = FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
        if family == "flux":
            from diffusers import FluxPipeline, FluxTransformer2DModel

            pipe: Any = FluxPipeline(
                scheduler=scheduler, vae=vae, transformer=FluxTransformer2DModel(**cfg["transformer"]),
                text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"], **ids)), tokenizer=clip_tok,
                text_encoder_2=T5EncoderModel(T5Config(**cfg["text_encoder_2"])), tokenizer_2=_t5_tokenizer(512))
        else:
            from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

            pipe = StableDiffusion3Pipeline(
                scheduler=scheduler, vae=vae, transformer=SD3Transformer2DModel(**cfg["transformer"]),
                text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder"], **ids)),
                tokenizer=clip_tok,
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"], **ids)),
                tokenizer_2=clip_tok,
                text_encoder_3=T5EncoderModel(T5Config(**cfg["text_encoder_3"])), tokenizer_3=_t5_tokenizer(256))
        save_into(pipe, tmp)
        shutil.rmtree(tok_dir)
    return out_dir
