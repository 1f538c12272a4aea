"""defaults.py's rule on a hand-made results table: within 2 paired s.e. of FP32's accuracy, then lowest FD."""

from __future__ import annotations

from benchmarks.shapes import defaults


def _mode(precision: str | None, diff: float, se: float, fd: float, reduction: str = "mean") -> dict:
    r = {"acc_diff": diff, "acc_diff_se": se, "frechet": fd, "frechet_se": 0.1,
         "accuracy": {"all": {"acc": 0.9 + diff, "se": 0.01}}}
    if precision:
        r["recipe"] = {"precision": precision, "level": 3.0 if precision == "int8" else 4.0, "percentile": 1.0,
                       "reduction": reduction, "smoothquant": False, "alpha": None}
    return r


def test_best_is_lowest_frechet_among_accurate_modes() -> None:
    res = {"FP32": _mode(None, 0.0, 0.0, 1.0),
           "INT8 max": _mode("int8", -0.01, 0.006, 1.5, "max"),   # within 2 s.e.
           "INT8 min": _mode("int8", -0.05, 0.01, 1.1, "min"),    # lowest FD but 5 s.e. below FP32: out
           "INT8 mean": _mode("int8", -0.02, 0.008, 1.3),         # 2.5 s.e. below: out
           "FP8 max": _mode("fp8", 0.0, 0.005, 1.2, "max")}
    assert defaults.best(res, "int8")[0] == "INT8 max"
    assert defaults.best(res, "fp8")[0] == "FP8 max"
    assert defaults.flags(res["INT8 max"]["recipe"]) == "--int8 --level 3 --percentile 1 --reduction max --no-smoothquant"
    res["INT8 max"]["acc_diff"] = -0.02
    assert defaults.best(res, "int8") is None
    assert any("keep the defaults" in line for line in defaults.summary({"results": res}))
