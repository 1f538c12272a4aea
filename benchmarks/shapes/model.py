"""The shapes text-to-image model: a pixel-space SD-architecture UNet2DConditionModel conditioned, through
cross-attention, on a tiny transformers CLIPTextModel over the scene vocabulary (trained jointly).

API (what the evaluation builds on):

    pipe = load_pipeline(weights_dir, device)            # ShapesPipeline: .unet, .text_encoder, .tokenize
    images = pipe(captions, seeds, steps=25, guidance=2.0)   # uint8 (N, 32, 32, 3), numpy
    images = sample(pipe.unet, pipe.text_encoder, captions, seeds, steps, guidance)   # the same, as a function

`sample` is guided DDIM (diffusers DDIMScheduler, epsilon prediction) with the unconditional and the
conditional halves in one UNet batch, as the SD pipelines do; `on_step(i, t)` is called before each UNet
call, so calibration can tap per step. Each image's starting noise comes from its own seed, so an image does
not depend on its batch. Captions come from render.caption(); "" is the unconditional caption.

Weights folder (flat, so it travels as few files): unet.safetensors, text_encoder.safetensors,
judge.safetensors and config.json (the UNet, text-encoder, judge and scheduler configs and the vocabulary).

The tokenizer is a word -> id dict rather than a transformers tokenizer: the vocabulary is 19 closed words,
and transformers' tokenizer classes changed between releases (4 -> 5), which this must not depend on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from benchmarks.shapes.render import SIZE, vocabulary

MAX_TOKENS = 16  # "a red circle to the right of a blue square" is 10 words, + bos and eos
TEXT_DIM = 64
SPECIALS = ("<pad>", "<bos>", "<eos>")

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=SIZE, in_channels=3, out_channels=3,
    block_out_channels=(64, 64, 96), layers_per_block=1,  # 3.2 M parameters: 12.8 MB in fp32, one file
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 2, 3),  # diffusers' name for the head count: head size 32
    cross_attention_dim=TEXT_DIM, norm_num_groups=32, use_linear_projection=True,
)
# --small: the same block kinds at a size a 2-core CPU trains in seconds
SMALL_UNET_CONFIG: dict[str, Any] = dict(
    UNET_CONFIG, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 2), norm_num_groups=16)

SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                        clip_sample=True, set_alpha_to_one=True, prediction_type="epsilon")


def vocab() -> dict[str, int]:
    words = list(SPECIALS) + vocabulary()
    return {w: i for i, w in enumerate(words)}


def text_config() -> dict[str, Any]:
    v = vocab()
    return dict(vocab_size=len(v), hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_TOKENS, pad_token_id=v["<pad>"],
                bos_token_id=v["<bos>"], eos_token_id=v["<eos>"], projection_dim=TEXT_DIM)


def tokenize(captions: list[str]) -> torch.Tensor:
    """(N, MAX_TOKENS) int64 ids: <bos> words <eos> <pad>...; unknown words are an error."""
    v = vocab()
    out = torch.full((len(captions), MAX_TOKENS), v["<pad>"], dtype=torch.int64)
    for i, c in enumerate(captions):
        ids = [v["<bos>"]] + [v[w] for w in c.split()] + [v["<eos>"]]
        if len(ids) > MAX_TOKENS:
            raise ValueError(f"caption too long ({len(ids)} tokens > {MAX_TOKENS}): {c!r}")
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def build_unet(small: bool = False) -> UNet2DConditionModel:
    return UNet2DConditionModel(**(SMALL_UNET_CONFIG if small else UNET_CONFIG))


def build_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**text_config()))


def make_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_CONFIG)


def encode(text_encoder: CLIPTextModel, captions: list[str]) -> torch.Tensor:
    """(N, MAX_TOKENS, TEXT_DIM) encoder_hidden_states for the UNet (the last hidden state, as SD 1.x)."""
    ids = tokenize(captions).to(text_encoder.device)
    return text_encoder(input_ids=ids).last_hidden_state


def seeded_noise(seeds: list[int] | np.ndarray, channels: int = 3) -> torch.Tensor:
    """(N, C, 32, 32) float32 standard normal noise, image i from its own CPU generator seeded seeds[i]."""
    return torch.stack([torch.randn((channels, SIZE, SIZE), generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC numpy."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, captions: list[str],
           seeds: list[int] | np.ndarray, steps: int = 25, guidance: float = 2.0, batch_size: int = 512,
           on_step: Callable[[int, Any], None] | None = None, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """uint8 (N, 32, 32, 3) images for `captions`, guided DDIM from per-image seeded noise."""
    if len(captions) != len(seeds):
        raise ValueError(f"{len(captions)} captions but {len(seeds)} seeds")
    device = next(unet.parameters()).device
    out = []
    for start in range(0, len(captions), batch_size):
        caps = list(captions[start:start + batch_size])
        n = len(caps)
        sched = make_scheduler()
        sched.set_timesteps(steps)
        x = seeded_noise(seeds[start:start + batch_size]).to(device)
        enc = torch.cat([encode(text_encoder, [""] * n), encode(text_encoder, caps)]).to(dtype)
        for i, t in enumerate(sched.timesteps):
            if on_step is not None:
                on_step(i, t)
            eps = unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=enc).sample.float()
            uncond, cond = eps.chunk(2)
            x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        out.append(to_uint8(x))
    return np.concatenate(out)


@dataclass
class ShapesPipeline:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    config: dict[str, Any] = field(default_factory=dict)

    tokenize = staticmethod(tokenize)

    def __call__(self, captions: list[str], seeds: list[int] | np.ndarray, steps: int = 25,
                 guidance: float = 2.0, **kw: Any) -> np.ndarray:
        return sample(self.unet, self.text_encoder, captions, seeds, steps, guidance, **kw)


def save_weights(out: Path, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                 judge: torch.nn.Module, judge_config: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(out / "unet.safetensors"))
    save_file({k: v.contiguous() for k, v in text_encoder.state_dict().items()},
              str(out / "text_encoder.safetensors"))
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(out / "judge.safetensors"))
    cfg = {"unet": dict(unet.config), "text_encoder": text_config(), "judge": judge_config,
           "scheduler": SCHEDULER_CONFIG, "vocab": vocab(), "max_tokens": MAX_TOKENS}
    (out / "config.json").write_text(json.dumps(cfg, indent=1, default=list) + "\n")


def _load(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)))


def load_pipeline(weights_dir: Path | str, device: str | torch.device = "cpu") -> ShapesPipeline:
    weights_dir = Path(weights_dir)
    cfg = json.loads((weights_dir / "config.json").read_text())
    if cfg["vocab"] != vocab():
        raise ValueError(f"{weights_dir}: vocabulary differs from this render.py's")
    ucfg = {k: v for k, v in cfg["unet"].items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(ucfg)
    _load(unet, weights_dir / "unet.safetensors")
    te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    _load(te, weights_dir / "text_encoder.safetensors")
    return ShapesPipeline(unet.to(device).eval(), te.to(device).eval(), cfg)
