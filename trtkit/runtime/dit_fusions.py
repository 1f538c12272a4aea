"""FLUX's MLPs with fewer passes over memory, for the compiled transformer.

Under torch.compile, Inductor runs each bf16 GEMM in cuBLAS and fuses what follows (bias, GELU) into a Triton
kernel that reads the GEMM's output back and writes it again; for the 12288-wide MLP activations of FLUX at
1024x1024 that is ~0.2 GB per block, 57 blocks a step. Two custom ops, opaque to Inductor, take those passes out:

* `linear_gelu_tanh(x, w, b)` = gelu_tanh(x @ w.T + b) as one cuBLASLt GEMM with the bias+GELU epilogue
  (torch._addmm_activation; its GELU is the tanh approximation on CUDA, which is what FLUX uses). On the CPU the
  op is the plain composition (torch's CPU _addmm_activation is the exact GELU, not tanh).
* `linear_of_cat(a, b, w, bias)` = cat([a, b], -1) @ w.T + bias as two GEMMs over column slices of w (views, no
  copy), the second accumulating into the first's output: the single-stream block's concatenation of the
  attention output and the MLP activation (4608 x 15360 at 1024x1024) is never written.

`fuse_flux_mlp(transformer)` points the modules' forwards at them, per instance: the FeedForward GELUs of the
double-stream blocks and the single-stream blocks' proj_mlp -> proj_out. Module names, parameters and state-dict
keys are unchanged, and each fused forward falls back to diffusers' own when a layer is no longer a plain
nn.Linear (a PEFT LoRA loaded later), so adapters still apply. Only a torch.compile'd transformer gains: the ops
are what Inductor cannot fuse, and eager torch runs the unfused forward as fast.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.library.custom_op("trtkit::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """gelu(x @ weight.T + bias, approximate="tanh"), one GEMM with its epilogue on CUDA."""
    if x.device.type != "cuda":
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("trtkit::linear_of_cat", mutates_args=())
def linear_of_cat(a: Tensor, b: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """F.linear(torch.cat([a, b], -1), weight, bias) without the concatenation."""
    ka = a.shape[-1]
    out = torch.addmm(bias, a.reshape(-1, ka), weight[:, :ka].t())
    out.addmm_(b.reshape(-1, b.shape[-1]), weight[:, ka:].t())
    return out.view(*a.shape[:-1], weight.shape[0])


@linear_of_cat.register_fake
def _(a: Tensor, b: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return a.new_empty((*a.shape[:-1], weight.shape[0]))


def plain_linear(m: Any) -> bool:
    """An nn.Linear with a bias and an ordinary floating-point weight: not a PEFT layer, not FP8."""
    return (type(m) is nn.Linear and m.bias is not None and type(m.weight.data) is torch.Tensor
            and m.weight.is_floating_point())


def _gelu_forward(self: Any, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """diffusers' activations.GELU with approximate="tanh": proj then GELU, as one op while proj is plain."""
    if plain_linear(self.proj):
        return linear_gelu_tanh(hidden_states, self.proj.weight, self.proj.bias)
    return type(self).forward(self, hidden_states, *args, **kwargs)


def _single_forward(self: Any, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                    image_rotary_emb: Any = None, joint_attention_kwargs: dict[str, Any] | None = None) -> Any:
    """FluxSingleTransformerBlock.forward (diffusers >= 0.35) with proj_mlp+GELU and proj_out(cat) fused."""
    if not (plain_linear(self.proj_mlp) and plain_linear(self.proj_out)):
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                  joint_attention_kwargs)
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    mlp = linear_gelu_tanh(norm_hidden_states, self.proj_mlp.weight, self.proj_mlp.bias)
    attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                            **(joint_attention_kwargs or {}))
    out = linear_of_cat(attn_output, mlp, self.proj_out.weight, self.proj_out.bias)
    hidden_states = residual + gate.unsqueeze(1) * out
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


# the single-stream block's forward that _single_forward restates (diffusers >= 0.35: text and image streams in)
SINGLE_BLOCK_PARAMS = ("self", "hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb",
                       "joint_attention_kwargs")


def fuse_flux_mlp(transformer: Any) -> dict[str, int]:
    """Point the FLUX MLPs' forwards at the fused ops (per instance; undo with `unfuse_flux_mlp`). Returns how
    many modules of each kind now run fused. Modules that do not match what the fused forward restates (another
    activation, no bias, another diffusers block signature) are left alone."""
    from diffusers.models.activations import GELU

    counts = {"feed_forward_gelu": 0, "single_block_mlp": 0}
    for m in transformer.modules():
        if type(m) is GELU and m.approximate == "tanh" and plain_linear(m.proj):
            m.forward = types.MethodType(_gelu_forward, m)
            counts["feed_forward_gelu"] += 1
        elif type(m).__name__ == "FluxSingleTransformerBlock" and _single_block_matches(m):
            m.forward = types.MethodType(_single_forward, m)
            counts["single_block_mlp"] += 1
    return counts


def _single_block_matches(block: Any) -> bool:
    params = tuple(inspect.signature(type(block).forward).parameters)
    act = getattr(block, "act_mlp", None)
    return (params == SINGLE_BLOCK_PARAMS and isinstance(act, nn.GELU) and act.approximate == "tanh"
            and plain_linear(getattr(block, "proj_mlp", None)) and plain_linear(getattr(block, "proj_out", None))
            and block.proj_out.in_features == block.attn.inner_dim + block.proj_mlp.out_features)


def unfuse_flux_mlp(transformer: Any) -> int:
    """diffusers' own forwards back on every module fuse_flux_mlp changed; returns how many."""
    fused = [m for m in transformer.modules() if _runs_fused(m)]
    for m in fused:
        del m.forward
    return len(fused)


def fused_mlp_count(transformer: Any) -> int:
    """How many modules run a fused forward (for the executor's fingerprint and options)."""
    return sum(1 for m in transformer.modules() if _runs_fused(m))


def _runs_fused(module: Any) -> bool:
    fwd = module.__dict__.get("forward")  # the per-instance forward fuse_flux_mlp set, not the class's
    return isinstance(fwd, types.MethodType) and fwd.__func__ in (_gelu_forward, _single_forward)
