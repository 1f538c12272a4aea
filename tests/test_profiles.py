from __future__ import annotations

from dataclasses import replace

import pytest

from trtkit.errors import TrtkitError
from trtkit.profiles import (
    PROFILES,
    ModelDims,
    ShapeRange,
    apply_overrides,
    check_against_inputs,
    get_profile,
    parse_shapes,
)

SDXL = ModelDims.from_configs(
    {"in_channels": 4, "cross_attention_dim": 2048, "addition_embed_type": "text_time",
     "projection_class_embeddings_input_dim": 2816, "addition_time_embed_dim": 256,
     "down_block_types": ["a", "b", "c"]},
    {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4},
    {"projection_dim": 1280},
)
SD15 = ModelDims.from_configs({"in_channels": 4, "cross_attention_dim": 768, "down_block_types": [1, 2, 3, 4]},
                              {"block_out_channels": [1, 2, 3, 4]})


def test_required_profiles_exist() -> None:
    for name in ("sd15-512", "sd21-768", "sdxl-1024", "sdxl-768", "sdxl-turbo-512"):
        assert name in PROFILES


def test_sdxl_dims_from_config() -> None:
    assert SDXL.text_embeds_dim == 1280 and SDXL.time_ids_len == 6 and SDXL.vae_scale_factor == 8
    refiner = ModelDims.from_configs({"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": 2560,
                                      "addition_time_embed_dim": 256, "cross_attention_dim": 1280},
                                     None, {"projection_dim": 1280})
    assert refiner.time_ids_len == 5


def test_sdxl_1024_guidance_doubles_batch() -> None:
    s = get_profile("sdxl-1024").shapes("unet", SDXL)
    assert s["sample"] == ShapeRange((2, 4, 128, 128), (2, 4, 128, 128), (8, 4, 128, 128))
    assert s["encoder_hidden_states"].max == (8, 77, 2048)
    assert s["text_embeds"].opt == (2, 1280) and s["time_ids"].opt == (2, 6)
    assert s["timestep"] == ShapeRange.fixed((1,))
    # The VAE decodes images, not guidance pairs: no doubling.
    assert get_profile("sdxl-1024").shapes("vae_decoder", SDXL)["latent"].min == (1, 4, 128, 128)
    assert get_profile("sdxl-1024").shapes("text_encoder_2", SDXL)["input_ids"].max == (8, 77)


def test_text_encoders_take_one_prompt_or_a_guidance_pair() -> None:
    """Finding 1: the pipeline encodes [negative; prompt] in one call (batch 2) or the prompt alone (batch 1)."""
    for name in ("sdxl-1024", "tiny-256"):
        r = get_profile(name).shapes("text_encoder", SDXL)["input_ids"]
        assert r.min == (1, 77) and r.opt == (2, 77) and r.max == (8, 77)
    st = get_profile("sdxl-1024").with_static().shapes("text_encoder_2", SDXL)["input_ids"]
    assert st.min == (1, 77) and st.max == (2, 77)


def test_turbo_has_no_guidance_doubling() -> None:
    s = get_profile("sdxl-turbo-512").shapes("unet", SDXL)
    assert s["sample"].min == (1, 4, 64, 64) and s["sample"].max == (4, 4, 64, 64)


def test_sd15_has_no_added_conditions() -> None:
    s = get_profile("sd15-512").shapes("unet", SD15)
    assert set(s) == {"sample", "timestep", "encoder_hidden_states"}
    assert s["encoder_hidden_states"].opt == (2, 77, 768)


def test_dynamic_resolution_and_static() -> None:
    p = get_profile("sdxl-dyn")
    s = p.shapes("unet", SDXL)["sample"]
    assert s.min == (2, 4, 64, 64) and s.opt == (2, 4, 128, 128) and s.max == (8, 4, 192, 192)
    st = p.with_static().shapes("unet", SDXL)["sample"]
    assert st.is_static and st.opt == (2, 4, 128, 128)
    assert p.with_batch(2).shapes("unet", SDXL)["sample"].opt == (4, 4, 128, 128)
    with pytest.raises(TrtkitError, match="outside"):
        p.with_batch(9)


def test_resolution_must_fit_the_model() -> None:
    with pytest.raises(TrtkitError, match="768x768 is not a multiple of 512 px"):
        get_profile("sdxl-768").shapes("unet", ModelDims(down_levels=7))  # needs 8 * 2**6
    assert get_profile("sdxl-768").shapes("unet", ModelDims(down_levels=4))


def test_one_profile_serves_tiny_and_real() -> None:
    tiny = ModelDims(cross_attention_dim=64, text_embeds_dim=32, down_levels=2)
    assert get_profile("sdxl-1024").shapes("unet", tiny)["encoder_hidden_states"].opt == (2, 77, 64)
    assert get_profile("sdxl-1024").shapes("unet", SDXL)["encoder_hidden_states"].opt == (2, 77, 2048)


def test_unknown_profile() -> None:
    with pytest.raises(TrtkitError, match="unknown profile 'sdxl-2048'; known profiles: sd15-512"):
        get_profile("sdxl-2048")


@pytest.mark.parametrize("text,expected", [
    ("sample:2x4x128x128,timestep:1", {"sample": (2, 4, 128, 128), "timestep": (1,)}),
    ("sample:2x4x128x128, encoder_hidden_states : 2x77x2048", {"sample": (2, 4, 128, 128),
                                                              "encoder_hidden_states": (2, 77, 2048)}),
    ("input:0:1x3", {"input:0": (1, 3)}),
    ("scalar:", {"scalar": ()}),
])
def test_parse_shapes(text: str, expected: dict) -> None:
    assert parse_shapes(text) == expected


@pytest.mark.parametrize("text,msg", [
    ("sample", "has no ':'"),
    ("sample:2x4xx128", "cannot read"),
    ("sample:2x-4", "cannot read"),
    ("sample:2x0x3", "zero dimension"),
    ("", "empty"),
    ("a:1,a:2", "given twice"),
    (":1x2", "cannot read"),
])
def test_parse_shapes_errors(text: str, msg: str) -> None:
    with pytest.raises(TrtkitError, match=msg):
        parse_shapes(text)


def test_overrides_merge_over_profile() -> None:
    base = get_profile("sdxl-1024").shapes("unet", SDXL)
    s = apply_overrides(base, shapes="sample:2x4x96x96", max_shapes="text_embeds:4x1280")
    assert s["sample"].is_static and s["sample"].opt == (2, 4, 96, 96)
    assert s["text_embeds"] == ShapeRange((2, 1280), (2, 1280), (4, 1280))
    assert s["time_ids"] == base["time_ids"]


def test_overrides_alone_need_all_corners() -> None:
    s = apply_overrides(None, min_shapes="x:1x3", opt_shapes="x:2x3", max_shapes="x:4x3")
    assert s["x"] == ShapeRange((1, 3), (2, 3), (4, 3))
    with pytest.raises(TrtkitError, match="has no opt/max shape"):
        apply_overrides(None, min_shapes="x:1x3")
    with pytest.raises(TrtkitError, match="min <= opt <= max"):
        apply_overrides(None, min_shapes="x:4x3", opt_shapes="x:2x3", max_shapes="x:4x3")
    with pytest.raises(TrtkitError, match="differ in rank"):
        apply_overrides(None, min_shapes="x:4", opt_shapes="x:4x3", max_shapes="x:4x3")


def test_check_against_model_inputs() -> None:
    shapes = apply_overrides(None, shapes="sample:2x4x64x64")
    check_against_inputs(shapes, {"sample": ("batch", 4, "h", "w")})
    with pytest.raises(TrtkitError, match="'sample' is not an input of the model; its inputs are: latent"):
        check_against_inputs(shapes, {"latent": ("b", 4, "h", "w")})
    with pytest.raises(TrtkitError, match="rank 4 but the model expects rank 3"):
        check_against_inputs(shapes, {"sample": ("b", 4, "h")})
    with pytest.raises(TrtkitError, match="dimension 1 is fixed to 8"):
        check_against_inputs(shapes, {"sample": ("b", 8, "h", "w")})


# --------------------------------------------------------------------------- DiT (trtkit/profiles_dit.py)

def _flux(guidance: bool) -> object:
    from trtkit.profiles_dit import DitDims

    # FLUX.1-dev / -schnell transformer configs (in_channels 64 = 16 latent channels packed 2x2)
    return DitDims.from_configs({"_class_name": "FluxTransformer2DModel", "in_channels": 64, "joint_attention_dim": 4096,
                                 "pooled_projection_dim": 768, "guidance_embeds": guidance},
                                {"block_out_channels": [128, 256, 512, 512]})


SD35M = {"_class_name": "SD3Transformer2DModel", "in_channels": 16, "patch_size": 2, "joint_attention_dim": 4096,
         "pooled_projection_dim": 2048}


def test_flux_1024_shapes_from_config() -> None:
    from trtkit.profiles_dit import shapes

    s = shapes(get_profile("flux-1024"), "transformer", _flux(True))
    assert {k: v.opt for k, v in s.items()} == {
        "hidden_states": (1, 4096, 64), "encoder_hidden_states": (1, 512, 4096), "pooled_projections": (1, 768),
        "timestep": (1,), "img_ids": (4096, 3), "txt_ids": (512, 3), "guidance": (1,)}
    assert s["hidden_states"].max == (4, 4096, 64)  # images per prompt, no CFG doubling
    schnell = shapes(get_profile("flux-1024"), "transformer", _flux(False))
    assert "guidance" not in schnell and schnell["encoder_hidden_states"].opt == (1, 256, 4096)
    assert shapes(get_profile("flux-1024"), "text_encoder_3", _flux(True))["input_ids"].opt == (1, 512)


def test_flux_dyn_packed_tokens() -> None:
    from trtkit.profiles_dit import shapes

    s = shapes(get_profile("flux-dyn"), "transformer", _flux(True))
    # (H/16)(W/16) packed latent tokens: 512 px -> 1024, 1536 px -> 9216
    assert s["hidden_states"].min == (1, 1024, 64) and s["hidden_states"].max == (4, 9216, 64)
    assert s["img_ids"].min == (1024, 3) and s["img_ids"].max == (9216, 3)


def test_sd3_1024_cfg_and_joint_tokens() -> None:
    from trtkit.profiles_dit import DitDims, shapes

    d = DitDims.from_configs(SD35M, {"block_out_channels": [128, 256, 512, 512]})
    s = shapes(get_profile("sd3-1024"), "transformer", d)
    assert {k: v.opt for k, v in s.items()} == {
        "hidden_states": (2, 16, 128, 128), "encoder_hidden_states": (2, 77 + 256, 4096),
        "pooled_projections": (2, 2048), "timestep": (2,)}
    assert s["hidden_states"].max[0] == 8
    assert shapes(get_profile("sd3-1024"), "text_encoder_3", d)["input_ids"].opt == (2, 256)


def test_dit_profile_errors() -> None:
    from trtkit.profiles_dit import DitDims, shapes

    with pytest.raises(TrtkitError, match="profile sd3-1024 is for SD3 models, but this is a FLUX transformer"):
        shapes(get_profile("sd3-1024"), "transformer", _flux(True))
    with pytest.raises(TrtkitError, match="takes its shapes from trtkit.profiles_dit"):
        get_profile("flux-1024").shapes("transformer", ModelDims())
    with pytest.raises(TrtkitError, match="not a multiple of 16 px"):
        shapes(replace(get_profile("flux-1024"), resolution=(1000, 1000)), "transformer", _flux(True))
    with pytest.raises(TrtkitError, match="UNet2DConditionModel is not a supported DiT"):
        DitDims.from_configs({"_class_name": "UNet2DConditionModel"})
