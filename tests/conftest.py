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
