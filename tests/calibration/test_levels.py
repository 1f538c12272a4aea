"""The quantization-level rule (demoDiffusion's levels and exclusions) on real diffusers names."""

from __future__ import annotations

import pytest

from trtkit.calibration.levels import quantized, targets
from trtkit.errors import TrtkitError

BLK = "down_blocks.1.attentions.0.transformer_blocks.0"


@pytest.mark.parametrize(("name", "kind", "lowest"), [
    ("down_blocks.1.resnets.0.conv1", "conv", 1.0),
    ("down_blocks.0.downsamplers.0.conv", "conv", 1.0),
    (f"{BLK}.ff.net.0.proj", "linear", 2.0),
    (f"{BLK}.ff.net.2", "linear", 2.0),
    (f"{BLK}.attn1.to_q", "linear", 2.5),
    (f"{BLK}.attn2.to_v", "linear", 2.5),
    (f"{BLK}.attn1.to_out.0", "linear", 3.0),
    ("down_blocks.1.attentions.0.proj_in", "linear", 3.0),
    (f"{BLK}.attn1", "attention", 4.0),
])
def test_lowest_level(name: str, kind: str, lowest: float) -> None:
    for level in (1.0, 2.0, 2.5, 3.0, 4.0):
        assert quantized(name, kind, level, head_size=64) == (level >= lowest), (name, level)


@pytest.mark.parametrize(("name", "kind"), [
    ("conv_in", "conv"), ("conv_out", "conv"), ("up_blocks.0.resnets.0.conv_shortcut", "conv"),
    ("time_embedding.linear_1", "linear"), ("down_blocks.0.resnets.0.time_emb_proj", "linear"),
    ("add_embedding.linear_2", "linear"), ("down_blocks.1.attentions.0.proj_out", "linear"),
])
def test_always_excluded(name: str, kind: str) -> None:
    assert not quantized(name, kind, 4.0, head_size=64)


def test_attention_needs_head_size_multiple_of_16() -> None:
    assert not quantized(f"{BLK}.attn1", "attention", 4.0, head_size=40)


def test_targets_on_tiny_unet(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tiny_model_dir / "unet"))
    t3, t4 = targets(unet, 3.0), targets(unet, 4.0)
    assert f"{BLK}.attn1.to_q" in t3 and "conv_in" not in t3 and "time_embedding.linear_1" not in t3
    assert set(t4) - set(t3) == {k for k, v in t4.items() if v == "attention"} != set()


def test_bad_level() -> None:
    from trtkit.calibration.levels import check_level

    with pytest.raises(TrtkitError, match="level 5"):
        check_level(5)
