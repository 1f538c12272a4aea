"""Per-step statistics recorded through the real hooks, and every reduction, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trtkit.calibration import percentile as pq
from trtkit.calibration.hooks import tapped
from trtkit.calibration.stats import StepStats
from trtkit.errors import TrtkitError

# amax of the input in pass p at step t (2 passes x 4 steps), chosen so that every reduction differs
TABLE = np.array([[4.0, 2.0, 6.0, 1.0],
                  [2.0, 8.0, 3.0, 5.0]])


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1)
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        return self.conv(img).sum() + self.fc(vec).sum()


def _record() -> StepStats:
    model = Toy()
    stats = StepStats(steps=4, channel_keys={"fc"})
    with torch.no_grad(), tapped(model, {"conv": "conv", "fc": "linear"}, stats.observe):
        for p in range(2):
            stats.begin_pass()
            for t in range(4):
                stats.step = t
                a = float(TABLE[p, t])
                img = torch.zeros(1, 1, 2, 2)
                img[0, 0, 1, 1] = -a  # the absolute max counts
                vec = torch.tensor([[0.5, -a, 0.25], [0.1, 0.2, 0.3 * a]])
                model(img, vec)
    return stats


def test_per_step_table_from_hooks() -> None:
    stats = _record()
    assert stats.passes == 2
    np.testing.assert_array_equal(stats.amax["conv"], TABLE)
    np.testing.assert_array_equal(stats.amax["fc"], TABLE)
    # per-channel: max over passes at each step; channel 1 carries the amax, channel 2 0.3 x it
    ch = stats.chan["fc"]
    np.testing.assert_allclose(ch[:, 1], TABLE.max(0))
    np.testing.assert_allclose(ch[:, 2], 0.3 * TABLE.max(0), rtol=1e-6)
    np.testing.assert_allclose(ch[:, 0], 0.5)
    assert stats.sample["fc"].shape[1] == 3


@pytest.mark.parametrize(("reduction", "percentile", "expected"), [
    ("max", 1.0, 8.0),
    ("min", 1.0, 4.0),          # per-step max [4, 8, 6, 5] -> min
    ("mean", 1.0, 5.75),        # mean of [4, 8, 6, 5]
    ("min-mean", 1.0, 3.0),     # per-step mean over passes [3, 5, 4.5, 3] -> min
    ("global-min", 1.0, 1.0),
    ("max", 0.5, 8.0),          # first int(4 * 0.5) = 2 steps
    ("min", 0.5, 4.0),
    ("mean", 0.5, 6.0),
    ("min-mean", 0.5, 3.0),
    ("global-min", 0.5, 2.0),
    ("min", 0.3, 4.0),          # int(1.2) = 1 step
    ("min-mean", 0.3, 3.0),
    ("global-min", 0.3, 2.0),
])
def test_reductions_hand_computed(reduction: str, percentile: float, expected: float) -> None:
    stats = _record()
    assert pq.reduce(stats.amax["conv"], percentile, reduction) == pytest.approx(expected)


def test_min_mean_divides_by_passes_not_steps() -> None:
    # ModelOpt would give min(sum/steps) = min([6, 10, 9, 6] / 4) = 1.5; trtkit's true mean gives 3
    assert pq.reduce(TABLE, 1.0, "min-mean") == pytest.approx(3.0)
    # independent of the number of passes: the same table repeated 5 times gives the same range
    assert pq.reduce(np.tile(TABLE, (5, 1)), 1.0, "min-mean") == pytest.approx(3.0)


def test_unseen_steps_are_ignored() -> None:
    t = TABLE.copy()
    t[:, 0] = np.nan
    assert pq.reduce(t, 1.0, "min") == pytest.approx(5.0)


@pytest.mark.parametrize(("p", "r", "msg"), [(0.0, "min", "percentile"), (1.5, "min", "percentile"),
                                            (1.0, "median", "reduction")])
def test_bad_settings(p: float, r: str, msg: str) -> None:
    with pytest.raises(TrtkitError, match=msg):
        pq.reduce(TABLE, p, r)


def test_stats_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    stats = _record()
    stats.save(tmp_path / "s.npz", {"x": 1})
    back, meta = StepStats.load(tmp_path / "s.npz")
    assert meta == {"x": 1} and back.passes == 2
    np.testing.assert_array_equal(back.amax["conv"], TABLE)
    np.testing.assert_array_equal(back.chan["fc"], stats.chan["fc"])
    np.testing.assert_array_equal(back.sample["fc"], stats.sample["fc"])
