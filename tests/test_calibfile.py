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
    ('{"format": "trtkit-calib", "version": 1, "activations": {"x": {"amax": -1}}}', "positive finite amax"),
])
def test_bad_files(tmp_path: Path, content: str, msg: str) -> None:
    (tmp_path / "c.json").write_text(content)
    with pytest.raises(TrtkitError, match=msg):
        load(tmp_path / "c.json")


def test_missing_arrays(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"format": "trtkit-calib", "version": 1,
                                                 "smoothquant": {"m": {"key": "m.smooth"}}, "arrays": "c.safetensors"}))
    with pytest.raises(TrtkitError, match="arrays file c.safetensors is missing"):
        load(tmp_path / "c.json")
