"""ControlNet export (trtkit/exporter_controlnet.py) on the tiny SD 1.5 and SDXL ControlNet pipelines: the
ControlNet and the residual-input UNet against diffusers in torch, and the CLI as users call it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from test_cli import assert_one_line_error, run_cli

from trtkit.exporter import META_COMPONENT, example_inputs, read_meta, run_onnxruntime
from trtkit.profiles import ModelDims, get_profile
from trtkit.profiles_controlnet import META_CONTROLNET, ControlNetSpec, shapes

REL_TOL = 1e-4  # FP32 in another order (as tests/test_exporter.py)
ARCHS = ["sd15", "sdxl"]


def _load(folder: Path, arch: str):  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    cls = StableDiffusionXLControlNetPipeline if arch == "sdxl" else StableDiffusionControlNetPipeline
    return cls.from_pretrained(str(folder))


def _torch_args(feeds: dict, names: list[str]) -> list:  # type: ignore[type-arg]
    import torch

    return [torch.from_numpy(feeds[n]) for n in names if n in feeds]


def test_tiny_multi_controlnet_folder_loads(tiny_controlnet_dir) -> None:  # type: ignore[no-untyped-def]
    """diffusers' own loader reads the two-ControlNet folder back as a MultiControlNetModel of two distinct nets."""
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    pipe = _load(tiny_controlnet_dir("sdxl", 2), "sdxl")
    assert isinstance(pipe.controlnet, MultiControlNetModel) and len(pipe.controlnet.nets) == 2
    a, b = (n.controlnet_mid_block.weight.detach() for n in pipe.controlnet.nets)
    assert float((a - b).abs().max()) > 0.01


@pytest.mark.parametrize("arch", ARCHS)
def test_controlnet_export_matches_torch(tiny_controlnet_dir, tiny_controlnet_onnx, arch: str) -> None:  # type: ignore[no-untyped-def]
    import torch

    folder = tiny_controlnet_dir(arch)
    r = tiny_controlnet_onnx(arch)["controlnet"]
    assert r.path.name == "controlnet.onnx" and r.max_rel_err is not None and r.max_rel_err < REL_TOL
    model = onnx.load(str(r.path))
    spec = ControlNetSpec.from_json(read_meta(model)[META_CONTROLNET])
    added = ["text_embeds", "time_ids"] if arch == "sdxl" else []
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond",
                                                   "conditioning_scale", *added]
    assert [o.name for o in model.graph.output] == spec.names == [
        *(f"down_block_res_samples_{i}" for i in range(6)), "mid_block_res_sample"]
    assert read_meta(model)[META_COMPONENT] == "controlnet"

    # Independent check at the profile's max corner (batch 8, image 256), with scale 0.5, against diffusers.
    sh = shapes(get_profile("tiny-256"), "controlnet", ModelDims.from_folder(folder), spec)
    assert sh["controlnet_cond"].opt == (2, 3, 256, 256)
    feeds = example_inputs(sh, "max", seed=3)
    feeds["conditioning_scale"] = np.array([0.5], np.float32)
    got = run_onnxruntime(r.path, feeds)
    pipe = _load(folder, arch)
    kw = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(feeds["text_embeds"]),
                                "time_ids": torch.from_numpy(feeds["time_ids"])}} if arch == "sdxl" else {}
    with torch.no_grad():
        down, mid = pipe.controlnet(*_torch_args(feeds, ["sample", "timestep", "encoder_hidden_states",
                                                         "controlnet_cond"]),
                                    conditioning_scale=0.5, return_dict=False, **kw)
    ref = [t.numpy() for t in (*down, mid)]
    assert [g.shape for g in got] == [x.shape for x in ref]
    assert ref[-1].shape == (8, 64, 16, 16)
    for g, x in zip(got, ref, strict=True):
        assert np.abs(x).max() > 1e-3  # the re-drawn zero convs: no residual is vacuously zero
        assert np.abs(g - x).max() <= REL_TOL * np.abs(x).max()


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_unet_matches_diffusers(tiny_controlnet_dir, tiny_controlnet_onnx, arch: str) -> None:  # type: ignore[no-untyped-def]
    """ControlNet then UNet in onnxruntime, fed ONNX to ONNX by name, equals diffusers' UNet with
    down_block_additional_residuals / mid_block_additional_residual; the residuals change the output."""
    import torch

    folder = tiny_controlnet_dir(arch)
    onnx_files = tiny_controlnet_onnx(arch)
    ur = onnx_files["unet"]
    assert ur.max_rel_err is not None and ur.max_rel_err < REL_TOL
    umodel = onnx.load(str(ur.path))
    cmodel = onnx.load(str(onnx_files["controlnet"].path))
    res_names = [o.name for o in cmodel.graph.output]
    added = ["text_embeds", "time_ids"] if arch == "sdxl" else []
    assert [i.name for i in umodel.graph.input] == ["sample", "timestep", "encoder_hidden_states", *added, *res_names]
    assert [o.name for o in umodel.graph.output] == ["noise_pred"]

    spec = ControlNetSpec.from_json(read_meta(cmodel)[META_CONTROLNET])
    feeds = example_inputs(shapes(get_profile("tiny-256"), "controlnet", ModelDims.from_folder(folder), spec),
                           "opt", seed=5)
    residuals = dict(zip(res_names, run_onnxruntime(onnx_files["controlnet"].path, feeds), strict=True))
    got = run_onnxruntime(ur.path, {**feeds, **residuals})[0]
    zero = run_onnxruntime(ur.path, {**feeds, **{k: np.zeros_like(v) for k, v in residuals.items()}})[0]

    pipe = _load(folder, arch)
    kw = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(feeds["text_embeds"]),
                                "time_ids": torch.from_numpy(feeds["time_ids"])}} if arch == "sdxl" else {}
    res_t = [torch.from_numpy(residuals[n]) for n in res_names]
    with torch.no_grad():
        ref = pipe.unet(*_torch_args(feeds, ["sample", "timestep", "encoder_hidden_states"]),
                        down_block_additional_residuals=tuple(res_t[:-1]), mid_block_additional_residual=res_t[-1],
                        return_dict=False, **kw)[0].numpy()
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= REL_TOL * scale
    assert np.abs(got - zero).max() > 0.05 * scale  # the residual path is not vacuous


def test_plain_folder_unet_has_no_residual_inputs(tiny_unet_onnx: Path) -> None:
    model = onnx.load(str(tiny_unet_onnx), load_external_data=False)
    assert META_CONTROLNET not in read_meta(model)
    assert not [i.name for i in model.graph.input if "res_sample" in i.name]


def test_cli_export_controlnet_with_defaults(tiny_controlnet_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`trtkit export MODEL -c controlnet` as a user types it: the default profile (sdxl-1024) gives the
    conditioning image the image size."""
    p = run_cli("export", str(tiny_controlnet_dir("sdxl")), "-c", "controlnet", "-o", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "max relative error" in p.stdout
    err = float(p.stdout.split("max relative error")[1].split()[0])
    assert err < REL_TOL
    model = onnx.load(str(tmp_path / "controlnet.onnx"), load_external_data=False)
    assert read_meta(model)["trtkit.profile"] == "sdxl-1024"
    spec = ControlNetSpec.from_json(read_meta(model)[META_CONTROLNET])
    sh = shapes(get_profile("sdxl-1024"), "controlnet", ModelDims.from_folder(tiny_controlnet_dir("sdxl")), spec)
    assert sh["controlnet_cond"].opt == (2, 3, 1024, 1024) and sh["sample"].opt == (2, 4, 128, 128)


def test_cli_multi_controlnet(tiny_controlnet_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Each ControlNet of a MultiControlNet folder is its own component, named like its folder; `-c controlnet`
    says the others are there."""
    folder = tiny_controlnet_dir("sdxl", 2)
    p = run_cli("export", str(folder), "-c", "controlnet", "-p", "tiny-256", "-o", str(tmp_path), "--no-check")
    assert p.returncode == 0, p.stderr
    assert "-c controlnet_1" in p.stdout
    p = run_cli("export", str(folder), "-c", "controlnet_1", "-p", "tiny-256", "-o", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert float(p.stdout.split("max relative error")[1].split()[0]) < REL_TOL
    feeds = None
    outs = []
    for name in ("controlnet", "controlnet_1"):
        m = onnx.load(str(tmp_path / f"{name}.onnx"))
        assert read_meta(m)[META_COMPONENT] == "controlnet"
        if feeds is None:
            spec = ControlNetSpec.from_json(read_meta(m)[META_CONTROLNET])
            feeds = example_inputs(shapes(get_profile("tiny-256"), "controlnet", ModelDims.from_folder(folder), spec),
                                   "opt", seed=1)
        outs.append(run_onnxruntime(tmp_path / f"{name}.onnx", feeds)[-1])
    assert np.abs(outs[0] - outs[1]).max() > 1e-3  # two different ControlNets, not one exported twice


@pytest.mark.parametrize("component,needle", [("controlnet", "has no controlnet/"),
                                              ("controlnet_1", "has no controlnet_1/")])
def test_cli_controlnet_on_a_folder_without_one(tiny_model_dir: Path, tiny_controlnet_dir, tmp_path: Path,
                                                component: str, needle: str) -> None:
    folder = tiny_model_dir if component == "controlnet" else tiny_controlnet_dir("sdxl")
    p = run_cli("export", str(folder), "-c", component, "-p", "tiny-256", "-o", str(tmp_path / "out"))
    assert_one_line_error(p, needle)
    assert not (tmp_path / "out").exists()
