"""Torch hooks on every input the Q/DQ pass quantizes.

A *tap* is `tap(key, tensor) -> tensor`: the calibration's recorder returns the tensor unchanged, fake
quantization returns its quantized copy. Keys are diffusers module names: a Conv2d/Linear key is the
module's name (the tap sees its input); an attention module `<attn>` gets four keys
`<attn>.q_bmm`, `<attn>.k_bmm`, `<attn>.v_bmm` (query, key, value after the head split, *before* the
1/sqrt(d) scaling) and `<attn>.softmax` (the probabilities entering the second BMM).

Plain forward pre-hooks serve Conv2d/Linear. Attention needs its own processor because diffusers'
default (SDPA) processor never materialises the BMM inputs; `TapAttnProcessor` is diffusers'
`AttnProcessor` math (the one demoDiffusion switches to at level 4) with taps in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

Tap = Callable[[str, torch.Tensor], torch.Tensor]


class TapAttnProcessor:
    """Explicit-BMM attention (diffusers `AttnProcessor` semantics) with taps on the BMM inputs."""

    def __init__(self, name: str, tap: Tap) -> None:
        self.name, self.tap = name, tap

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,  # type: ignore[no-untyped-def]
                 temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = self.tap(f"{self.name}.q_bmm", attn.head_to_batch_dim(query))
        key = self.tap(f"{self.name}.k_bmm", attn.head_to_batch_dim(key))
        value = self.tap(f"{self.name}.v_bmm", attn.head_to_batch_dim(value))
        probs = self.tap(f"{self.name}.softmax", attn.get_attention_scores(query, key, attention_mask))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def tapped(model: torch.nn.Module, targets: dict[str, str], tap: Tap) -> Iterator[None]:
    """Route every target input of `model` ({name: "conv"|"linear"|"attention"}) through `tap`."""
    modules = dict(model.named_modules())
    handles = []
    saved: dict[str, object] = {}
    try:
        for name, kind in targets.items():
            m = modules[name]
            if kind == "attention":
                saved[name] = m.processor
                m.set_processor(TapAttnProcessor(name, tap))
            else:
                def pre(mod, args, _name=name):  # type: ignore[no-untyped-def]
                    return (tap(_name, args[0]),) + tuple(args[1:])

                handles.append(m.register_forward_pre_hook(pre))
        yield
    finally:
        for h in handles:
            h.remove()
        for name, proc in saved.items():
            modules[name].set_processor(proc)
