"""The demo's run stage: the tiny pipeline end to end through the runtime, writing image.png."""

from __future__ import annotations

from pathlib import Path

import pytest

from trtkit.demo import DemoConfig, DemoState, Skipped
from trtkit.runtime.demo_stage import demo_stage


def test_demo_stage_writes_png(tiny_model_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    state = DemoState(DemoConfig(workdir=tmp_path, steps=2), model_dir=tiny_model_dir)
    msg, files = demo_stage(state)
    assert state.image == tmp_path / "image.png" == files[0]
    assert Image.open(state.image).size == (256, 256) and "2 steps" in msg


def test_demo_stage_without_model_is_skipped(tmp_path: Path) -> None:
    with pytest.raises(Skipped):
        demo_stage(DemoState(DemoConfig(workdir=tmp_path)))


@pytest.mark.gpu
def test_demo_stage_on_gpu_uses_one_graph(tiny_model_dir: Path, tmp_path: Path) -> None:
    state = DemoState(DemoConfig(workdir=tmp_path), model_dir=tiny_model_dir)
    msg, _ = demo_stage(state)
    assert "one CUDA graph" in msg and state.image.is_file()
