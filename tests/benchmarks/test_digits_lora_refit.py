"""benchmarks/digits/lora_refit.py, small: trtkit's numpy refit path (read_adapter -> fused weight ->
scales.quantize_weight) gives exactly the torch path's weights (PEFT fuse -> fake_quant_weight), and a LoRA-refit
INT8 UNet (base activation scales, new weight scales) is far closer to the fused-FP32 samples than the stale base."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "digits" / "lora_refit.py"


def test_lora_refit_small(tmp_path: Path) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("digits_lora_refit", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.main(["--lora", "random", "--random-std", "3", "--per-digit", "2", "--steps", "4", "--calib-prompts", "2",
                  "--precisions", "INT8", "--out", str(tmp_path)])
    assert all(v < 1e-6 for v in r["paths_agree"].values()), r["paths_agree"]
    rows = r["rows"]
    refit = rows["INT8 refit (base calibration, new weight scales)"]["rmse"]
    fresh = rows["INT8 freshly calibrated on the fused model"]["rmse"]
    stale = rows["INT8 base, no LoRA (stale)"]["rmse"]
    assert refit < stale / 2 and refit < 1.5 * fresh + 1e-3, rows
    assert (tmp_path / "results.json").is_file()
