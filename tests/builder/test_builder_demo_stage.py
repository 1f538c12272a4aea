from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from trtkit.demo import DemoConfig, DemoState


@pytest.mark.rtx
def test_demo_stage_builds_the_tiny_unet(tiny_unet_onnx: Path, tmp_path: Path) -> None:
    from trtkit.builder.demo_stage import demo_stage

    state = DemoState(DemoConfig(workdir=tmp_path))
    state.onnx = tiny_unet_onnx
    t0 = time.perf_counter()
    msg, files = demo_stage(state)
    seconds = time.perf_counter() - t0
    assert state.engine == tmp_path / "engines" / "unet.plan" and state.engine.is_file()
    assert files[:2] == [state.engine, state.engine.with_suffix(".json")]
    doc = json.loads(state.engine.with_suffix(".json").read_text())
    assert [p["name"] for p in doc["profiles"]] == ["tiny-256"]
    assert "unet.plan" in msg and "built in" in msg
    assert seconds < 120  # budget ~30 s on an idle 2-core CPU; generous here for a loaded CI machine
    msg, _ = demo_stage(state)  # the demo run twice reuses the plan
    assert "cache hit" in msg


def test_demo_stage_skips_without_onnx(tmp_path: Path) -> None:
    from trtkit.builder.demo_stage import demo_stage
    from trtkit.demo import Skipped

    with pytest.raises(Skipped):
        demo_stage(DemoState(DemoConfig(workdir=tmp_path)))
