"""benchmarks/bench_controlnet.py's CPU smoke mode (--size tiny --device cpu): the script the lead runs on the H200
runs end to end, and its trtkit row gives diffusers' latents with two ControlNets, before and after a new image and
scale."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


def test_cpu_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_controlnet

    out = tmp_path / "cn.json"
    monkeypatch.setattr(sys, "argv", ["bench_controlnet.py", "--size", "tiny", "--device", "cpu", "--arch", "sdxl",
                                      "--controlnets", "2", "--steps", "2", "--warmup", "0", "--repeats", "1",
                                      "--out", str(out)])
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny modules: one thread is faster on a loaded two-core machine
    try:
        assert bench_controlnet.main() == 0
    finally:
        torch.set_num_threads(n)
    r = json.loads(out.read_text())
    assert r["finite"] and r["controlnets"] == 2
    assert r["trtkit_vs_diffusers_rel"] < 1e-4 and r["trtkit_vs_diffusers_rel_new_image_scale"] < 1e-4
    assert r["controlnet_effect_rel"] > 1e-2 and not r["recaptured_on_new_image_scale"]
    assert [row["name"] for row in r["rows"]] == ["diffusers", "trtkit accelerate (tuned, loop graph)",
                                                  "diffusers (again, last)"]
