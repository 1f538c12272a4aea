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


# --------------------------------------------------------------------------- DiT (trtkit/exporter_dit.py)

@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dit_transformer_export_matches_torch(family: str, tiny_dit_dir, tiny_dit_onnx) -> None:
    """Exported with tiny-256 (checked on export); run here at another shape, 2 images per prompt and a
    non-square 192x320, against the diffusers transformer called the way its pipeline calls it."""
    import torch

    from trtkit import exporter_dit
    from trtkit.exporter import META_DIT_DIMS, load_component
    from trtkit.profiles_dit import DitDims, sample_values, shapes

    path = tiny_dit_onnx(family)
    model = onnx.load(str(path))
    meta = read_meta(model)
    assert meta[META_COMPONENT] == "transformer" and meta[META_SCOPE] == "/transformer/"
    dims = DitDims.from_json(meta[META_DIT_DIMS])
    assert dims == DitDims.from_folder(tiny_dit_dir(family))
    names = [i.name for i in model.graph.input]
    if family == "flux":
        assert names == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids",
                         "txt_ids", "guidance"]
        assert dims.guidance_embeds and dims.t5_tokens == 512  # FLUX.1-dev layout: guidance embedding, no CFG
    else:
        assert names == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
    assert not any(a.i == onnx.TensorProto.DOUBLE for n in model.graph.node if n.op_type == "Cast"
                   for a in n.attribute if a.name == "to")  # TensorRT has no float64 (FLUX RoPE)

    from trtkit.profiles import Profile

    prof = Profile("user", resolution=(192, 320), batch=(2, 2, 2), guidance=False, t5_tokens=64)
    sh = shapes(prof, "transformer", dims)
    feeds = example_inputs(sh, "opt", seed=5, fill=sample_values(prof, dims))
    module = load_component(tiny_dit_dir(family), "transformer")
    wrap, _ = exporter_dit.wrapper(module, False, sh)
    with torch.no_grad():
        ref = wrap(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    got = run_onnxruntime(path, feeds)[0]
    assert got.shape == ((2, 240, 16) if family == "flux" else (2, 4, 24, 40))
    assert np.max(np.abs(got - ref)) <= REL_TOL * np.max(np.abs(ref))


@pytest.mark.parametrize(("family", "component"), [("flux", "text_encoder_2"), ("sd3", "text_encoder_3")])
def test_t5_export(family: str, component: str, tiny_dit_dir, tmp_path: Path) -> None:
    """The T5 encoder (FLUX's text_encoder_2, SD3's text_encoder_3), tokens from the model (512 / 256), with
    its weights in a .data file as past 2 GB."""
    profile = "flux-1024" if family == "flux" else "sd3-1024"
    r = export(ExportConfig(model_dir=tiny_dit_dir(family), component=component, profile=profile, out_dir=tmp_path,
                            external_data=True))
    assert r.inputs["input_ids"].opt == ((1, 512) if family == "flux" else (2, 256))
    assert r.external_data == tmp_path / f"{component}.onnx.data" and r.external_data.stat().st_size > 50_000
    assert r.max_rel_err is not None and r.max_rel_err < REL_TOL
    model = onnx.load(str(r.path), load_external_data=False)
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]


def test_dit_export_cli_and_errors(tiny_dit_dir, tmp_path: Path) -> None:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "trtkit", "export", str(tiny_dit_dir("sd3")), "-c", "transformer",
                        "-p", "flux-1024", "-o", str(tmp_path / "o")], capture_output=True, text=True)
    errs = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and len(errs) == 1 and "profile flux-1024 is for FLUX models" in errs[0], p.stderr
    assert not (tmp_path / "o" / "transformer.onnx").exists()
    with pytest.raises(TrtkitError, match="AutoencoderKL is not a supported DiT"):
        export(ExportConfig(model_dir=tiny_dit_dir("sd3") / "vae", component="transformer", profile="tiny-256",
                            out_dir=tmp_path / "x"))
