from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from trtkit.errors import TrtkitError
from trtkit.exporter import (
    META_COMPONENT,
    META_SCOPE,
    ExportConfig,
    example_inputs,
    export,
    read_meta,
    run_onnxruntime,
)
from trtkit.profiles import ModelDims, get_profile

# Export tolerance: the ONNX graph computes the same FP32 math in another order (onnxruntime's
# kernels vs torch's), so errors sit near FP32 rounding. Bound them at 1e-4 relative to the output scale.
REL_TOL = 1e-4


def test_tiny_unet_export_matches_torch(tiny_model_dir: Path, tiny_unet_onnx: Path) -> None:
    import torch

    from trtkit.exporter import _wrapper, load_component

    model = onnx.load(str(tiny_unet_onnx))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "encoder_hidden_states", "text_embeds",
                                                   "time_ids"]
    assert [o.name for o in model.graph.output] == ["noise_pred"]
    meta = read_meta(model)
    assert meta[META_COMPONENT] == "unet" and meta[META_SCOPE] == "/unet/"
    # Dynamic batch and spatial axes so one file serves several profiles.
    sample = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in sample] == ["batch", 4, "height", "width"]

    # Independent check at a shape other than the export's (max corner, batch 8, of tiny-256).
    shapes = get_profile("tiny-256").shapes("unet", ModelDims.from_folder(tiny_model_dir))
    feeds = example_inputs(shapes, "max", seed=3)
    unet = load_component(tiny_model_dir, "unet")
    wrap, _ = _wrapper("unet", unet, sdxl=True)
    with torch.no_grad():
        ref = wrap(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    got = run_onnxruntime(tiny_unet_onnx, feeds)[0]
    assert got.shape == (8, 4, 32, 32)
    assert np.max(np.abs(got - ref)) <= REL_TOL * np.max(np.abs(ref))


@pytest.mark.parametrize("component", ["vae_decoder", "text_encoder", "text_encoder_2"])
def test_other_components_export(tiny_model_dir: Path, tmp_path: Path, component: str) -> None:
    r = export(ExportConfig(model_dir=tiny_model_dir, component=component, profile="tiny-256", out_dir=tmp_path))
    assert r.path == tmp_path / f"{component}.onnx" and r.path.exists()
    assert r.max_rel_err is not None and r.max_rel_err < REL_TOL
    names = [i.name for i in onnx.load(str(r.path)).graph.input]
    assert names == (["latent"] if component == "vae_decoder" else ["input_ids"])


def test_external_data(tiny_model_dir: Path, tmp_path: Path) -> None:
    r = export(ExportConfig(model_dir=tiny_model_dir, component="unet", profile="tiny-256", out_dir=tmp_path,
                            external_data=True, check=True))
    assert r.external_data == tmp_path / "unet.onnx.data" and r.external_data.stat().st_size > 1_000_000
    assert r.path.stat().st_size < r.external_data.stat().st_size / 4
    assert r.max_rel_err is not None and r.max_rel_err < REL_TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]


def test_shapes_override_and_unknown_input(tiny_model_dir: Path, tmp_path: Path) -> None:
    r = export(ExportConfig(model_dir=tiny_model_dir, profile="tiny-256", out_dir=tmp_path, check=False,
                            shapes="sample:2x4x16x16"))
    assert r.inputs["sample"].opt == (2, 4, 16, 16)
    with pytest.raises(TrtkitError, match="'latents' is not an input of this UNet"):
        export(ExportConfig(model_dir=tiny_model_dir, profile="tiny-256", out_dir=tmp_path / "x", check=False,
                            shapes="latents:2x4x16x16"))


def test_missing_folder_and_not_a_pipeline(tmp_path: Path) -> None:
    with pytest.raises(TrtkitError, match="does not exist"):
        export(ExportConfig(model_dir=tmp_path / "nope", out_dir=tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrtkitError, match="not a diffusers model folder"):
        export(ExportConfig(model_dir=tmp_path / "empty", out_dir=tmp_path / "o"))
