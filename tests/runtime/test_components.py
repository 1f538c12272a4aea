"""Which components run as engines and what they are fed, against the real TensorRT-RTX text encoder and UNet
plans of the tiny pipeline (findings 1 and 6), on the CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trtkit.runtime.components import (
    check_encoder,
    check_unet,
    check_vae,
    encoder_shapes,
    encoder_texts,
    engine_files,
    engine_modules,
    modules_not_loaded,
    modules_on_device,
    pipeline_modules,
)
from trtkit.runtime.plan import EngineDesc, EngineError, ProfileSpec, pick_profile


def tokens(model_dir: Path) -> int:
    return json.loads((model_dir / "tokenizer" / "tokenizer_config.json").read_text()).get("model_max_length", 77)


@pytest.mark.rtx
@pytest.mark.parametrize("cfg,negative,zero_negative,batch", [
    (True, "blurry", False, 2),   # guidance: [negative; prompt] in one call
    (True, "", True, 1),          # SDXL's zero negative for an empty negative prompt: the prompt alone
    (False, "", False, 1),        # guidance <= 1: the prompt alone
])
def test_encoder_call_fits_the_rtx_text_encoders(rtx_pipeline_plans: dict[str, dict[str, Any]], tiny_model_dir: Path,
                                                  cfg: bool, negative: str, zero_negative: bool, batch: int) -> None:
    """Finding 1: the batch the pipeline asks the text encoders for lies inside the profile of the real plans
    (batch 1 was always refused: the profile started at 2)."""
    texts = encoder_texts("a red cube", negative, cfg, zero_negative)
    assert len(texts) == batch and texts[-1] == "a red cube"
    if batch == 2:
        assert texts[0] == "blurry"  # the UNet's [uncond; cond] order
    shapes = encoder_shapes(texts, tokens(tiny_model_dir))
    for comp, outputs in (("text_encoder", ["penultimate_hidden_state"]),
                          ("text_encoder_2", ["penultimate_hidden_state", "pooled_output"])):
        desc = EngineDesc.from_metadata(rtx_pipeline_plans[comp]["meta"], comp)
        assert desc.profiles[0].ranges["input_ids"][0] == (1, 77)  # profiles.py: min batch 1
        check_encoder(desc, shapes, outputs)
        # the profile the builder used to make (min batch 2) refuses the one-prompt call
        old = EngineDesc(comp, desc.tensors, (ProfileSpec("old", {"input_ids": ((2, 77), (2, 77), (8, 77))}),))
        if batch == 1:
            with pytest.raises(EngineError, match="no optimization profile covers input_ids 1x77"):
                pick_profile(old, shapes)


@pytest.mark.rtx
def test_unet_engine_matches_the_pipeline(rtx_unet_plans: dict[str, dict[str, Any]],
                                          rtx_pipeline_plans: dict[str, dict[str, Any]]) -> None:
    for p in ("fp16", "int8", "fp8"):
        check_unet(EngineDesc.from_metadata(rtx_unet_plans[p]["meta"], "unet"), sdxl=True)
    desc = EngineDesc.from_metadata(rtx_unet_plans["fp16"]["meta"], "unet")
    with pytest.raises(EngineError, match="is not the pipeline's UNet"):
        check_unet(desc, sdxl=False)  # an SDXL UNet for an SD 1.x pipeline
    te = EngineDesc.from_metadata(rtx_pipeline_plans["text_encoder"]["meta"], "text_encoder")
    with pytest.raises(EngineError, match="is not the pipeline's UNet"):
        check_unet(te, sdxl=True)
    with pytest.raises(EngineError, match="text_encoder has no output images"):
        check_encoder(te, {"input_ids": (1, 77)}, ["images"])
    vae = EngineDesc.from_metadata(rtx_pipeline_plans["vae_decoder"]["meta"], "vae_decoder")
    check_vae(vae, (1, 4, 32, 32))  # what EngineEncoders.decode feeds for one 256x256 image
    with pytest.raises(EngineError, match="no optimization profile covers latent 1x4x48x48"):
        check_vae(vae, (1, 4, 48, 48))
    with pytest.raises(EngineError, match="is not the pipeline's VAE decoder"):
        check_vae(te, (1, 4, 32, 32))


def test_which_modules_engines_take(tmp_path: Path) -> None:
    sdxl = ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"]
    assert engine_modules(["unet"], sdxl) == {"unet"}
    assert engine_modules(["unet", "text_encoder"], sdxl) == {"unet"}  # torch still encodes with both
    assert engine_modules(["unet", "text_encoder", "text_encoder_2", "vae_decoder"], sdxl) == {
        "unet", "text_encoder", "text_encoder_2", "vae"}
    assert engine_modules(["unet", "text_encoder"], ["text_encoder", "unet", "vae"]) == {"unet", "text_encoder"}
    taken = engine_modules(["unet", "vae_decoder"], sdxl)
    assert modules_not_loaded(taken) == ["unet"]
    assert modules_on_device(["unet", "text_encoder", "text_encoder_2", "vae"], taken) == ["text_encoder",
                                                                                          "text_encoder_2"]
    assert pipeline_modules({"_class_name": "X", "unet": ["diffusers", "UNet2DConditionModel"],
                             "image_encoder": [None, None]}) == ["unet"]
    (tmp_path / "unet.plan").write_bytes(b"ftrt")
    (tmp_path / "vae_decoder.plan").write_bytes(b"ftrt")
    assert engine_files(tmp_path) == ["unet", "vae_decoder"] and engine_files(tmp_path / "unet.plan") == ["unet"]
    assert engine_files(None) == []


def test_engine_pipeline_holds_no_torch_unet_or_text_encoders(tiny_model_dir: Path) -> None:
    """Finding 6: with engines for the UNet and both text encoders, the loaded pipeline holds none of their
    weights (not loaded at all); only the modules that stay in torch are moved to the device."""
    import torch

    from trtkit.runtime.pipeline import is_sdxl, load_pipeline, unet_config

    engines = ["unet", "text_encoder", "text_encoder_2"]
    pipe = load_pipeline(tiny_model_dir, "cpu", engines)
    assert pipe.unet is None and pipe.text_encoder is None and pipe.text_encoder_2 is None
    params = [p for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) if isinstance(m, torch.nn.Module)
              for p in m.parameters()]
    assert params == []
    assert pipe.vae is not None and pipe.tokenizer is not None and pipe.tokenizer_2 is not None
    cfg = unet_config(pipe, tiny_model_dir)
    assert is_sdxl(pipe, cfg) and cfg.in_channels == 4 and cfg.sample_size == 32
    full = load_pipeline(tiny_model_dir, "cpu")
    assert sum(p.numel() for p in full.unet.parameters()) > 0 and unet_config(full) == full.unet.config


def test_engine_encoders_encode_once_per_prompt_on_the_cpu(tiny_model_dir: Path) -> None:
    """EngineEncoders with the text encoders' torch modules standing in for the engines (same I/O names): one
    batch-2 call with guidance, giving the same conditioning as diffusers' encode_prompt."""
    import torch

    from trtkit.runtime.pipeline import EngineEncoders, encode, load_pipeline

    pipe = load_pipeline(tiny_model_dir, "cpu")

    class TorchEncoder:
        """A text encoder module behind Engine.infer's interface (numpy in, numpy out), counting calls."""

        def __init__(self, module: Any, name: str, sdxl_2: bool) -> None:
            self.module, self.calls, self.sdxl_2 = module, [], sdxl_2
            meta = {"io": {"inputs": [{"name": "input_ids", "shape": [-1, -1], "dtype": "int32"}],
                           "outputs": [{"name": n, "shape": [-1, -1, 32], "dtype": "float"} for n in
                                       ("last_hidden_state", "pooled_output", "penultimate_hidden_state")]},
                    "profiles": [{"name": "p", "shapes": {"input_ids": {"min": [1, 77], "opt": [2, 77],
                                                                         "max": [8, 77]}}}]}
            self.desc = EngineDesc.from_metadata(meta, name)

        def infer(self, feeds: dict[str, np.ndarray], stream: int) -> dict[str, np.ndarray]:
            self.calls.append(feeds["input_ids"].shape)
            with torch.no_grad():
                out = self.module(torch.from_numpy(feeds["input_ids"]).long(), output_hidden_states=True)
            pooled = out.text_embeds if self.sdxl_2 else out.pooler_output
            return {"last_hidden_state": out.last_hidden_state.numpy(), "pooled_output": pooled.numpy(),
                    "penultimate_hidden_state": out.hidden_states[-2].numpy()}

    class Stream:
        handle = 0

    engines = {"text_encoder": TorchEncoder(pipe.text_encoder, "text_encoder", False),
               "text_encoder_2": TorchEncoder(pipe.text_encoder_2, "text_encoder_2", True)}
    enc = EngineEncoders(pipe, engines, Stream())
    got, shape = enc.encode("a red cube", "blurry", True, 256, 256)
    assert engines["text_encoder"].calls == [(2, 77)] and engines["text_encoder_2"].calls == [(2, 77)]
    want, want_shape = encode(pipe, "a red cube", "blurry", True, 256, 256, "cpu")
    assert shape == want_shape
    for k in ("encoder_hidden_states", "text_embeds", "time_ids"):
        np.testing.assert_allclose(got[k], want[k].numpy(), rtol=1e-5, atol=1e-5)
    got1, shape1 = enc.encode("a red cube", "", False, 256, 256)  # guidance off: batch 1
    assert engines["text_encoder"].calls[-1] == (1, 77) and got1["encoder_hidden_states"].shape[0] == 1
    assert not shape1.cfg
