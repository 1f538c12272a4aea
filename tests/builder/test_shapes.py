from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from builder_models import sd15_like

from trtkit.builder.config import BuildConfig
from trtkit.builder.shapes import resolve_profiles
from trtkit.builder.source import read_onnx
from trtkit.errors import TrtkitError
from trtkit.profiles import ModelDims, ShapeRange, get_profile

SMALL = "sample:2x4x16x16,timestep:1,encoder_hidden_states:2x77x64,text_embeds:2x32,time_ids:2x6"


def resolve(onnx_path: Path, **kw):  # type: ignore[no-untyped-def]
    cfg = BuildConfig(onnx=onnx_path, output=onnx_path.with_suffix(".plan"), **kw)
    return resolve_profiles(cfg, read_onnx(onnx_path))


def test_preset_from_model_folder(tiny_unet_onnx: Path, tiny_model_dir: Path) -> None:
    profiles, origin = resolve(tiny_unet_onnx, profiles=("tiny-256",))
    assert origin == f"model folder {tiny_model_dir}"
    want = get_profile("tiny-256").shapes("unet", ModelDims.from_folder(tiny_model_dir))
    assert [p.name for p in profiles] == ["tiny-256"] and profiles[0].shapes == want
    assert want["sample"] == ShapeRange((2, 4, 32, 32), (2, 4, 32, 32), (8, 4, 32, 32))


def test_dims_from_onnx_when_folder_is_gone(tiny_unet_onnx: Path, tmp_path: Path) -> None:
    m = onnx.load(str(tiny_unet_onnx))
    for p in m.metadata_props:
        if p.key == "trtkit.source":
            p.value = str(tmp_path / "moved-away")
    onnx.save(m, str(tmp_path / "unet.onnx"))
    from_onnx, origin = resolve(tmp_path / "unet.onnx", profiles=("tiny-256",))
    from_folder, _ = resolve(tiny_unet_onnx, profiles=("tiny-256",))
    assert origin == "static dims of the ONNX inputs"
    assert from_onnx == from_folder


def test_two_profiles_preset_and_inline(tiny_unet_onnx: Path) -> None:
    profiles, _ = resolve(tiny_unet_onnx, profiles=("tiny-256", SMALL))
    assert [p.name for p in profiles] == ["tiny-256", "shapes"]
    assert profiles[1].shapes["sample"] == ShapeRange.fixed((2, 4, 16, 16))


def test_overrides_apply_to_presets(tiny_unet_onnx: Path) -> None:
    profiles, _ = resolve(tiny_unet_onnx, profiles=("tiny-256",), max_shapes="sample:4x4x32x32,"
                          "encoder_hidden_states:4x77x64,text_embeds:4x32,time_ids:4x6")
    assert profiles[0].shapes["sample"].max == (4, 4, 32, 32)
    static, _ = resolve(tiny_unet_onnx, profiles=("tiny-256",), static=True)
    assert all(r.is_static for r in static[0].shapes.values())


def test_shapes_alone(tiny_unet_onnx: Path) -> None:
    profiles, _ = resolve(tiny_unet_onnx, shapes=SMALL)
    assert [p.name for p in profiles] == ["shapes"]


@pytest.mark.parametrize("kw, needle", [
    (dict(profiles=("tiny-512",)), "unknown profile 'tiny-512'"),
    (dict(shapes=SMALL + ",foo:1x2"), "'foo' is not an input"),
    (dict(shapes=SMALL.replace("sample:2x4x16x16", "sample:2x4x16")), "rank 3"),
    (dict(shapes=SMALL.replace("sample:2x4x16x16", "sample:2x3x16x16")), "fixed to 4"),
    (dict(shapes="sample:2x4x16x16,timestep:1"), "no shape for input 'encoder_hidden_states'"),
    (dict(), "name a --profile"),
    (dict(profiles=("tiny-256", "tiny-256")), "given twice"),
])
def test_errors(tiny_unet_onnx: Path, kw: dict, needle: str) -> None:
    with pytest.raises(TrtkitError, match=needle):
        resolve(tiny_unet_onnx, **kw)


def test_profile_input_missing_from_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    # SDXL sizes from the folder give text_embeds/time_ids, which this SD 1.x-style model lacks.
    with pytest.raises(TrtkitError, match="'text_embeds' is not an input of sd15.onnx \\(profile tiny-256\\)"):
        resolve(sd15_like(tmp_path / "sd15.onnx"), profiles=("tiny-256",), model_dir=tiny_model_dir)


def test_sd15_dims_from_onnx(tmp_path: Path) -> None:
    profiles, _ = resolve(sd15_like(tmp_path / "sd15.onnx"), profiles=("sd15-512",))
    assert set(profiles[0].shapes) == {"sample", "timestep", "encoder_hidden_states"}
    assert profiles[0].shapes["encoder_hidden_states"].opt == (2, 77, 64)
