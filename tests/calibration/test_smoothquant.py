"""SmoothQuant is exact before quantization and lowers the INT8 error of a layer with activation outliers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trtkit.calibration import smoothquant as sq


def _layer_with_outliers(seed: int = 0) -> tuple[torch.Tensor, torch.nn.Linear]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 64, generator=g)
    x[:, [3, 17, 40]] *= 60.0  # a few outlier channels, as in transformer activations
    lin = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=g) * 0.1)
    return x, lin


def test_transform_is_exact_in_fp32() -> None:
    x, lin = _layer_with_outliers()
    s = sq.smooth_vector(x.abs().amax(0).numpy(), sq.weight_in_amax(lin.weight), 0.8)
    st = torch.as_tensor(s, dtype=torch.float32)
    ref = lin(x)
    smoothed = (x / st) @ (lin.weight * st).T
    torch.testing.assert_close(smoothed, ref, rtol=1e-5, atol=1e-4)


def test_fakequant_context_is_exact_without_quantization() -> None:
    """The same check through the calibration-file path: smoothing alone leaves the output unchanged."""
    from trtkit.calibfile import Calibration
    from trtkit.calibration.fakequant import quantized

    x, lin = _layer_with_outliers()
    model = torch.nn.Sequential(lin)
    s = sq.smooth_vector(x.abs().amax(0).numpy(), sq.weight_in_amax(lin.weight), 0.8).astype(np.float32)
    cal = Calibration(activations={"0": 1.0}, smooth={"0": s})
    ref = model(x)
    with torch.no_grad(), quantized(model, cal, weights=False, activations=False):
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(model(x), ref)  # restored afterwards


def test_search_lowers_quantized_error_on_outliers() -> None:
    x, lin = _layer_with_outliers()
    chan = x.abs().amax(0).numpy().astype(np.float64)

    def amax_for(s):  # type: ignore[no-untyped-def]
        return float(chan.max()) if s is None else float((chan / s).max())

    res = sq.search(x.numpy(), lin.weight, chan, amax_for)
    assert res.alpha in sq.ALPHAS
    assert res.error < 0.5 * res.error_unsmoothed, (res.error, res.error_unsmoothed)
    # the grid search is at least as good as the usual fixed 0.5 and 0.8
    for a in (0.5, 0.8):
        assert res.error <= sq.search(x.numpy(), lin.weight, chan, amax_for, fixed=a).error + 1e-12


def test_search_leaves_a_layer_without_outliers_alone_when_smoothing_hurts() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g)
    lin = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=g))
        lin.weight[:, 5] *= 100.0  # a weight outlier: smoothing would move range the wrong way
    chan = x.abs().amax(0).numpy().astype(np.float64)
    res = sq.search(x.numpy(), lin.weight, chan,
                    lambda s: float(chan.max()) if s is None else float((chan / s).max()))
    assert res.error <= res.error_unsmoothed


@pytest.mark.gpu
def test_search_takes_a_cuda_fp16_weight() -> None:
    """`trtkit calibrate --smoothquant` on a GPU: the UNet's weights are CUDA FP16, the recorded rows CPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    x, lin = _layer_with_outliers()
    chan = x.abs().amax(0).numpy().astype(np.float64)

    def amax_for(s):  # type: ignore[no-untyped-def]
        return float(chan.max()) if s is None else float((chan / s).max())

    ref = sq.search(x.numpy(), lin.weight.half().float(), chan, amax_for)
    got = sq.search(x.numpy(), lin.weight.cuda().half(), chan, amax_for)
    assert got.alpha == ref.alpha and got.error == pytest.approx(ref.error, rel=1e-6)
