from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trtkit.calibfile import Calibration, load, save
from trtkit.errors import TrtkitError


def test_round_trip(tmp_path: Path) -> None:
    cal = Calibration(precision="int8", activations={"a.to_q": 2.5, "a.q_bmm": 1.0},
                      smooth={"a.to_q": np.array([1.0, 2.0, 0.5], np.float32)}, alphas={"a.to_q": 0.8},
                      run={"steps": 30}, settings={"method": "percentile"})
    p = save(cal, tmp_path / "calib.json")
    assert (tmp_path / "calib.safetensors").exists()
    back = load(p)
    assert back.activations == cal.activations and back.alphas == {"a.to_q": 0.8}
    np.testing.assert_array_equal(back.smooth["a.to_q"], cal.smooth["a.to_q"])
    assert back.run == {"steps": 30}
    back.check_modules(["a.to_q", "a"])
    with pytest.raises(TrtkitError, match="names module 'a.to_q', which the model does not have"):
        back.check_modules(["a"])


@pytest.mark.parametrize("content,msg", [
    ("not json", "not JSON"),
    ('{"format": "other"}', "not a trtkit calibration file"),
    ('{"format": "trtkit-calib", "version": 9}', "version 9"),
    ('{"format": "trtkit-calib", "version": 1, "precision": "int8", "model": {}, "settings": {}, '
     '"activations": {"x": {"amax": -1}}}', "positive finite amax"),
])
def test_bad_files(tmp_path: Path, content: str, msg: str) -> None:
    (tmp_path / "c.json").write_text(content)
    with pytest.raises(TrtkitError, match=msg):
        load(tmp_path / "c.json")


def test_missing_arrays(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"format": "trtkit-calib", "version": 1, "precision": "int8",
                                                 "model": {}, "settings": {}, "activations": {"m": {"amax": 1.0}},
                                                 "smoothquant": {"m": {"key": "m.smooth"}}, "arrays": "c.safetensors"}))
    with pytest.raises(TrtkitError, match="arrays file c.safetensors is missing"):
        load(tmp_path / "c.json")


FULL = {"format": "trtkit-calib", "version": 1, "precision": "int8", "model": {"config_hash": "abc"},
        "run": {}, "settings": {"level": 3.0}, "activations": {"a": {"amax": 1.0}}}


@pytest.mark.parametrize("drop, msg", [
    ("activations", 'has no "activations" entry'),  # newcomer trial P9: was accepted, all ranges from a sample run
    ("precision", 'has no "precision" entry'),
    ("settings", 'has no "settings" entry'),
    ("model", 'has no "model" entry'),
])
def test_incomplete_files_are_refused(tmp_path: Path, drop: str, msg: str) -> None:
    (tmp_path / "c.json").write_text(json.dumps({k: v for k, v in FULL.items() if k != drop}))
    with pytest.raises(TrtkitError, match=msg):
        load(tmp_path / "c.json")


@pytest.mark.parametrize("change, msg", [
    ({"activations": {}}, "has no activation ranges: it carries no calibration"),
    ({"precision": "int4"}, "precision 'int4' is not int8 or fp8"),
    ({"settings": [1]}, "must be JSON objects"),
])
def test_empty_or_odd_entries(tmp_path: Path, change: dict, msg: str) -> None:
    (tmp_path / "c.json").write_text(json.dumps(FULL | change))
    with pytest.raises(TrtkitError, match=msg):
        load(tmp_path / "c.json")


def test_config_hash_is_checked(tmp_path: Path, tiny_model_dir: Path) -> None:
    from trtkit.calibfile import check_model, unet_config_hash
    from trtkit.calibration.calibrate import model_info

    real = json.loads((tiny_model_dir / "unet" / "config.json").read_text())
    assert unet_config_hash(real) == model_info(tiny_model_dir)["config_hash"]  # what calibrate writes
    cal = Calibration(activations={"a": 1.0}, model={"config_hash": unet_config_hash(real)})
    check_model(cal, tiny_model_dir, "m.onnx")
    cal.model = {"config_hash": "0123456789abcdef", "source": "/models/other"}
    with pytest.raises(TrtkitError, match=r"made for another UNet \(/models/other, config hash 0123456789abcdef\)"
                                          r".*delete \"config_hash\""):
        check_model(cal, tiny_model_dir, "m.onnx")
    check_model(cal, None, "m.onnx")  # the ONNX does not say where it came from: nothing to check
    cal.model = {}
    check_model(cal, tiny_model_dir, "m.onnx")  # the documented override: no config_hash
