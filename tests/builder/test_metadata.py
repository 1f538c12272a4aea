from __future__ import annotations

import json
from pathlib import Path

import pytest

from trtkit.builder import metadata as md


def test_cache_key_stable_and_sensitive() -> None:
    a = {"onnx_sha256": "ab", "profiles": [{"name": "tiny-256"}], "precision": "fp16"}
    assert md.cache_key(a) == md.cache_key(dict(reversed(list(a.items()))))
    assert md.cache_key(a) != md.cache_key({**a, "precision": "int8"})
    assert len(md.cache_key(a)) == 64


def test_write_read_and_cache_hit(tmp_path: Path) -> None:
    plan = tmp_path / "e.plan"
    plan.write_bytes(b"x" * 10)
    md.write_metadata(tmp_path / "e.json", {"cache_key": "k1", "plan": {"bytes": 10},
                                            "profiles": [{"shapes": {"sample": {"min": [1, 4, 8, 8]}}}]})
    text = (tmp_path / "e.json").read_text()
    assert '"min": [1, 4, 8, 8]' in text  # shapes stay on one line
    doc = md.read_metadata(tmp_path / "e.json")
    assert doc is not None and doc["format"] == "trtkit-engine" and doc["cache_key"] == "k1"
    assert md.is_cache_hit(plan, tmp_path / "e.json", "k1")
    assert not md.is_cache_hit(plan, tmp_path / "e.json", "k2")
    plan.write_bytes(b"x" * 11)  # a plan that is not the one recorded
    assert not md.is_cache_hit(plan, tmp_path / "e.json", "k1")
    plan.unlink()
    assert not md.is_cache_hit(plan, tmp_path / "e.json", "k1")


def test_read_rejects_other_json(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "b.json").write_text("{not json")
    assert md.read_metadata(tmp_path / "a.json") is None
    assert md.read_metadata(tmp_path / "b.json") is None
    assert md.read_metadata(tmp_path / "missing.json") is None


@pytest.mark.rtx
def test_layers_not_saved_without_gpu() -> None:
    from trtkit.backend import load_backend

    be = load_backend("rtx")
    if be.can_run:
        pytest.skip("this machine can deserialize TensorRT-RTX plans")
    text, reason = md.engine_layers(be, b"")
    assert text is None and reason.startswith("not saved: tensorrt_rtx cannot deserialize")


def test_inspection_shapes_are_profile_0_opt(tmp_path: Path) -> None:
    """Review finding 9: the saved layer JSON is resolved at profile 0's opt shapes (as a live inspect is)."""
    from builder_models import sd15_like

    from trtkit.builder.config import BuildConfig
    from trtkit.builder.metadata import inspection_shapes
    from trtkit.builder.shapes import resolve_profiles
    from trtkit.builder.source import read_onnx

    onnx = sd15_like(tmp_path / "unet.onnx")
    cfg = BuildConfig(onnx=onnx, output=tmp_path / "e.plan", profiles=("sd15-512", "sd15-dyn"))
    profiles, _ = resolve_profiles(cfg, read_onnx(onnx))
    shapes = inspection_shapes([p.to_json() for p in profiles])
    assert shapes == {n: tuple(r.opt) for n, r in profiles[0].shapes.items()}
    assert shapes["sample"] == (2, 4, 64, 64) and shapes["encoder_hidden_states"] == (2, 77, 64)
    assert inspection_shapes([]) == {}
