"""Shared fixtures: the tiny SDXL-architecture pipeline and its exported UNet, built once per session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


def _has_gpu() -> bool:
    from trtkit.backend import gpu_info

    return gpu_info()[0] is not None


def _has_module(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin in (None, "namespace"):
        return False
    return True


HAS_GPU = _has_gpu()
HAS_TENSORRT = _has_module("tensorrt") and HAS_GPU
HAS_RTX = _has_module("tensorrt_rtx")


def _imports(name: str) -> bool:
    try:
        __import__(name)  # the top-level package is light; its missing undeclared deps show up later
        return True
    except Exception:
        return False


HAS_MODELOPT = _imports("modelopt")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {
        "gpu": (HAS_GPU, "needs a CUDA GPU; none here"),
        "tensorrt": (HAS_TENSORRT, "needs the full TensorRT (10.x/11.x) and a GPU; not installed here"),
        "rtx": (HAS_RTX, "needs TensorRT-RTX (pip install 'trtkit[rtx]')"),
        "modelopt": (HAS_MODELOPT, "needs nvidia-modelopt (pip install 'trtkit[modelopt]'; see docs/calibration.md)"),
    }
    for item in items:
        for mark, (ok, why) in reasons.items():
            if item.get_closest_marker(mark) is not None and not ok:  # not keywords: they hold folder names
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trtkit.tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_unet_onnx(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny UNet exported with the tiny-256 profile (checked against torch on export)."""
    from trtkit.exporter import ExportConfig, export

    out = tmp_path_factory.mktemp("onnx")
    r = export(ExportConfig(model_dir=tiny_model_dir, component="unet", profile="tiny-256", out_dir=out))
    return r.path


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRTKIT_DEBUG", raising=False)
    if "TRTKIT_BACKEND" in os.environ:
        monkeypatch.delenv("TRTKIT_BACKEND")


# The tiny UNet built by TensorRT-RTX on the CPU (one target, SM89) in FP16, INT8 and FP8, each with two
# optimization profiles: the builder's tests check the builds, the runtime's tests decide from their metadata.
RTX_TARGET = ("8.9",)
RTX_SMALL = "sample:2x4x16x16,timestep:1,encoder_hidden_states:2x77x64,text_embeds:2x32,time_ids:2x6"


@pytest.fixture(scope="session")
def rtx_unet_builds(tiny_unet_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """precision -> (BuildConfig, BuildResult); profiles tiny-256 then a static 16x16-latent one."""
    pytest.importorskip("tensorrt_rtx")
    pytest.importorskip("trtkit.graph.qdq")
    from trtkit.builder.build import build
    from trtkit.builder.config import BuildConfig
    from trtkit.calibfile import Calibration, save

    d = tmp_path_factory.mktemp("rtx-unet")
    # one range from the file; the Q/DQ pass measures the others on its sample run (with a warning)
    calib = save(Calibration(precision="int8", activations={"down_blocks.0.resnets.0.conv1": 4.0},
                             settings={"note": "test: other ranges from the pass's sample run"}), d / "calib.json")
    out = {}
    for p in ("fp16", "int8", "fp8"):
        cfg = BuildConfig(onnx=tiny_unet_onnx, output=d / p / "unet.plan", profiles=("tiny-256", RTX_SMALL),
                          target_cc=RTX_TARGET, progress=False, precision=p, calib=calib if p == "int8" else None)
        out[p] = (cfg, build(cfg))
    return out
@pytest.fixture(scope="session")
def tiny_controlnet_dir(tmp_path_factory: pytest.TempPathFactory):
    """(arch "sd15" | "sdxl", n_controlnets) -> a tiny ControlNet pipeline folder (trtkit/tiny_controlnet.py),
    made once."""
    made: dict[tuple[str, int], Path] = {}

    def get(arch: str = "sdxl", n: int = 1) -> Path:
        if (arch, n) not in made:
            from trtkit.tiny_controlnet import make_tiny_controlnet_pipeline

            made[arch, n] = make_tiny_controlnet_pipeline(tmp_path_factory.mktemp(f"cn-{arch}-{n}") / "model",
                                                          arch=arch, n_controlnets=n)
        return made[arch, n]

    return get


@pytest.fixture(scope="session")
def tiny_controlnet_onnx(tiny_controlnet_dir, tmp_path_factory: pytest.TempPathFactory):
    """arch -> {"controlnet": ExportResult, "unet": ExportResult} of the one-ControlNet folder, exported with
    tiny-256 (each checked against torch on export), made once."""
    from trtkit.exporter import ExportConfig, export

    made: dict[str, dict] = {}

    def get(arch: str) -> dict:
        if arch not in made:
            out = tmp_path_factory.mktemp(f"cn-onnx-{arch}")
            made[arch] = {c: export(ExportConfig(model_dir=tiny_controlnet_dir(arch), component=c, profile="tiny-256",
                                                 out_dir=out)) for c in ("controlnet", "unet")}
        return made[arch]

    return get


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory: pytest.TempPathFactory):
    """family ("flux" | "sd3") -> a tiny pipeline folder (trtkit/data/tiny-<family>.json), made once."""
    from trtkit.tiny_dit import make_tiny_dit_pipeline

    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_tiny_dit_pipeline(family, tmp_path_factory.mktemp(f"tiny-{family}") / "model")
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny_dit_onnx(tiny_dit_dir, tmp_path_factory: pytest.TempPathFactory):
    """family -> its transformer exported with tiny-256 (checked against torch on export), made once."""
    from trtkit.exporter import ExportConfig, export

    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            out = tmp_path_factory.mktemp(f"onnx-{family}")
            made[family] = export(ExportConfig(model_dir=tiny_dit_dir(family), component="transformer",
                                               profile="tiny-256", out_dir=out)).path
        return made[family]

    return get
