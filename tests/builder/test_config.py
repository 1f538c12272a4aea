from __future__ import annotations

from pathlib import Path

import pytest

from trtkit.builder.config import BuildConfig, parse_size, parse_target
from trtkit.errors import TrtkitError


@pytest.mark.parametrize("text, n", [("8G", 8 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("4096", 4096),
                                     ("64k", 64 << 10), ("2 GB", 2 << 30)])
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["8X", "", "-1G", "G", "0"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(TrtkitError):
        parse_size(text)


@pytest.mark.parametrize("text, cc", [("8.9", "8.9"), ("sm89", "8.9"), ("SM_120", "12.0"), ("86", "8.6"),
                                      ("current", "current")])
def test_parse_target(text: str, cc: str) -> None:
    assert parse_target(text) == cc


def test_parse_target_rejects_hopper() -> None:
    with pytest.raises(TrtkitError, match="9.0"):
        parse_target("9.0")  # TensorRT-RTX has no SM90


def test_defaults_and_normalisation() -> None:
    c = BuildConfig(onnx="m.onnx", output="out/e.plan", profiles="tiny-256", workspace="8G", target_cc=("sm89",))
    assert c.onnx == Path("m.onnx") and c.output == Path("out/e.plan")
    assert c.profiles == ("tiny-256",) and c.workspace == 8 << 30 and c.target_cc == ("8.9",)
    assert c.metadata_path == Path("out/e.json") and c.layers_path == Path("out/e.layers.json")
    assert c.effective_opt_level == 3
    assert BuildConfig(onnx="m.onnx", output="e.plan", precision="int8").effective_opt_level == 4
    assert BuildConfig(onnx="m.onnx", output="e.plan", precision="fp8").effective_opt_level == 4
    assert BuildConfig(onnx="m.onnx", output="e.plan", precision="fp8", opt_level=2).effective_opt_level == 2


def test_rtx_targets() -> None:
    assert BuildConfig(onnx="m.onnx", output="e.plan").rtx_targets == ()  # TensorRT-RTX's portable default
    assert BuildConfig(onnx="m.onnx", output="e.plan", precision="fp8").rtx_targets == ("8.9", "12.0")
    assert BuildConfig(onnx="m.onnx", output="e.plan", target_cc=("8.6",)).rtx_targets == ("8.6",)


@pytest.mark.parametrize("kw, needle", [
    (dict(precision="bf8"), "unknown precision"),
    (dict(opt_level=6), "outside 0..5"),
    (dict(precision="fp8", target_cc=("8.6",)), "FP8 needs compute capability 8.9"),
    (dict(fp16_base=True), "int8/fp8"),
    (dict(target_cc=("current", "8.9")), "only target"),
    (dict(output="e.json"), ".json"),
])
def test_rejects(kw: dict, needle: str) -> None:
    args = dict(onnx="m.onnx", output="e.plan") | kw
    with pytest.raises(TrtkitError, match=needle):
        BuildConfig(**args)


def test_frozen() -> None:
    c = BuildConfig(onnx="m.onnx", output="e.plan")
    with pytest.raises(AttributeError):
        c.precision = "fp16"  # type: ignore[misc]
