"""The demo stage calibrates the tiny pipeline into the demo folder and sets state.calib."""

from __future__ import annotations

import time
from pathlib import Path

from trtkit import calibfile
from trtkit.demo import DemoConfig, DemoState


def test_demo_stage(tiny_model_dir: Path, tmp_path: Path) -> None:
    from trtkit.calibration.demo_stage import demo_stage

    state = DemoState(DemoConfig(workdir=tmp_path), model_dir=tiny_model_dir)
    t0 = time.perf_counter()
    msg, files = demo_stage(state)
    seconds = time.perf_counter() - t0
    assert state.calib == tmp_path / "calib.json" and state.calib in files
    cal = calibfile.load(state.calib)
    assert cal.run["height"] == 256 and cal.run["steps"] == 4 and cal.activations
    assert "INT8 ranges" in msg
    assert seconds < 60, seconds  # budget ~20 s on an idle 2-core CPU; generous for a loaded CI box
