"""What breaks a CUDA graph, and what the loop runner does about each (after tinygrad's footgun tests).

A captured graph replays fixed kernels on fixed addresses with fixed launch parameters. Each test shows one
way that goes wrong and checks the runner's answer: re-capture, keep working without re-capture, or a
named error (GraphCaptureError, GraphMismatchError)."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_fakes import SHAPE, CopyExecutor, HostSyncExecutor, reference_copy_loop

from trtkit.runtime.executors import LoopShape
from trtkit.runtime.graph_runner import GraphCaptureError, GraphMismatchError, LoopRunner
from trtkit.runtime.schedulers import draw_noise, make_scheduler, make_tables

pytestmark = pytest.mark.gpu

BASE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon"}


def _tab(name: str = "euler", steps: int = 10):  # type: ignore[no-untyped-def]
    return make_tables(make_scheduler(name, BASE), steps, name)


def _x(shape: LoopShape = SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape.latent).astype(np.float32)


def test_changed_shape_is_recaptured() -> None:
    """Footgun: a graph replays the grid sizes and buffer sizes it captured; a new resolution through the
    old graph would read/write the wrong number of elements. Runner: new buffers + new capture."""
    r = LoopRunner(CopyExecutor(), device="cuda")
    tab = _tab()
    a = r(SHAPE, tab, x_init=_x(), guidance=2.0)
    other = LoopShape(1, 4, 8, 8, True, 77, 64, 32, 6)
    b = r(other, tab, x_init=_x(other), guidance=2.0)
    assert r.captures == 2 and a.shape == SHAPE.latent and b.shape == other.latent
    np.testing.assert_allclose(b, reference_copy_loop(tab, _x(other), 2.0, True, None), rtol=1e-4, atol=1e-4)


def test_changed_input_address_is_recaptured_or_refused() -> None:
    """Footgun: rebinding an input to a new buffer leaves the graph reading the old address (stale data,
    or freed memory). Runner: the captured key holds every address; a change re-captures, or raises
    GraphMismatchError with recapture=False."""
    from trtkit.runtime.cuda import DeviceArray

    ex = CopyExecutor()
    r = LoopRunner(ex, device="cuda", recapture=False)
    tab = _tab()
    r(SHAPE, tab, x_init=_x(), guidance=2.0)
    r.loop.io["sample"] = DeviceArray.empty(r.loop.io["sample"].shape, np.float32)  # a new address
    with pytest.raises(GraphMismatchError, match="sample"):
        r.run()
    r.recapture = True
    r.run()
    assert r.captures == 2


def test_host_sync_inside_capture_is_a_named_error() -> None:
    """Footgun: a host synchronisation (stream sync, .item(), a D2H copy) inside the captured region
    invalidates the capture. Runner: GraphCaptureError naming the way out; the eager loop still works."""
    r = LoopRunner(HostSyncExecutor(), device="cuda")
    tab = _tab()
    with pytest.raises(GraphCaptureError, match="no-cuda-graph"):
        r(SHAPE, tab, x_init=_x(), guidance=2.0)
    r.use_graph = False
    out = r(SHAPE, tab, x_init=_x(), guidance=2.0)
    np.testing.assert_allclose(out, reference_copy_loop(tab, _x(), 2.0, True, None), rtol=1e-4, atol=1e-4)


def test_torch_item_inside_capture_is_a_named_error(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from trtkit.runtime.executors import TorchExecutor
    from trtkit.runtime.pipeline import encode, load_pipeline

    class ItemExecutor(TorchExecutor):
        def __call__(self, stream: int) -> None:
            super().__call__(stream)
            float(self.t["noise_pred"].abs().max().item())  # host sync

    pipe = load_pipeline(tiny_model_dir, "cuda")
    cond, shape = encode(pipe, "x", "", True, 128, 128, "cuda")
    r = LoopRunner(ItemExecutor(pipe.unet), device="cuda")
    with pytest.raises(GraphCaptureError):
        r(shape, _tab(steps=3), x_init=_x(shape), guidance=3.0, **cond)


def test_values_change_without_recapture() -> None:
    """Not a footgun when values live in the bound buffers: new latents, guidance, conditioning and
    scheduler tables (same N) are copied INTO the captured addresses; the same graph gives new results."""
    r = LoopRunner(CopyExecutor(), device="cuda")
    tab = _tab("ddim", 12)
    r(SHAPE, tab, x_init=_x(seed=0), guidance=2.0)
    tab2 = make_tables(make_scheduler("ddim", {**BASE, "timestep_spacing": "trailing"}), 12, "ddim")
    out = r(SHAPE, tab2, x_init=_x(seed=5), guidance=9.0)
    assert r.captures == 1
    np.testing.assert_allclose(out, reference_copy_loop(tab2, _x(seed=5), 9.0, True, None), rtol=1e-4, atol=1e-4)


def test_replay_twice_gives_the_same_result() -> None:
    """Footgun: state carried across replays (a step counter, DPM's previous x0) makes the second replay
    start where the first ended. Runner: the captured init kernel resets the counter and x0_prev."""
    r = LoopRunner(CopyExecutor(), device="cuda")
    tab = _tab("dpmpp_2m", 15)
    a = r(SHAPE, tab, x_init=_x(), guidance=4.0)
    b = r(SHAPE, tab, x_init=_x(), guidance=4.0)
    np.testing.assert_array_equal(a, b)


def test_new_seed_noise_without_recapture() -> None:
    """Footgun: random numbers drawn inside a capture are frozen into the graph (every replay gets the same
    'random' noise). Runner: ancestral noise is a device table written before each run."""
    r = LoopRunner(CopyExecutor(), device="cuda")
    tab = _tab("euler_a", 10)
    n1, n2 = draw_noise(tab, SHAPE.latent, 1), draw_noise(tab, SHAPE.latent, 2)
    a = r(SHAPE, tab, x_init=_x(), guidance=2.0, noise=n1)
    b = r(SHAPE, tab, x_init=_x(), guidance=2.0, noise=n2)
    assert r.captures == 1 and not np.array_equal(a, b)
    np.testing.assert_allclose(b, reference_copy_loop(tab, _x(), 2.0, True, n2), rtol=1e-4, atol=1e-4)


def test_step_count_change_is_recaptured() -> None:
    """Footgun: the number of UNet launches is part of the graph. Runner: a new N re-captures."""
    r = LoopRunner(CopyExecutor(), device="cuda")
    r(SHAPE, _tab(steps=10), x_init=_x(), guidance=2.0)
    out = r(SHAPE, _tab(steps=4), x_init=_x(), guidance=2.0)
    assert r.captures == 2
    np.testing.assert_allclose(out, reference_copy_loop(_tab(steps=4), _x(), 2.0, True, None), rtol=1e-4,
                               atol=1e-4)


def test_replaced_weights_recapture_in_place_updates_do_not(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """Footgun (LoRA swaps, stable-fast#143): a graph bakes in the weights' addresses. Updating a weight in
    place shows in the next replay; replacing the tensor does not, unless the graph is re-captured.
    Runner: the executor's fingerprint (parameter addresses) is part of the captured key."""
    import torch

    from trtkit.runtime.executors import TorchExecutor
    from trtkit.runtime.pipeline import encode, load_pipeline

    pipe = load_pipeline(tiny_model_dir, "cuda")
    cond, shape = encode(pipe, "x", "", True, 128, 128, "cuda")
    ex = TorchExecutor(pipe.unet)
    r = LoopRunner(ex, device="cuda")
    tab = _tab(steps=4)
    a = r(shape, tab, x_init=_x(shape), guidance=3.0, **cond)
    conv = pipe.unet.conv_out
    with torch.no_grad():
        conv.bias.add_(0.5)  # in place: same address
    b = r(shape, tab, x_init=_x(shape), guidance=3.0, **cond)
    assert r.captures == 1 and not np.array_equal(a, b)
    conv.bias = torch.nn.Parameter(conv.bias.detach() - 0.5)  # a new tensor
    c = r(shape, tab, x_init=_x(shape), guidance=3.0, **cond)
    assert r.captures == 2
    eager = LoopRunner(ex, device="cuda", use_graph=False)(shape, tab, x_init=_x(shape), guidance=3.0, **cond)
    np.testing.assert_array_equal(c, eager)


def test_ancestral_loop_without_noise_is_refused() -> None:
    """Footgun: a graph happily reads a device table nobody wrote (garbage 'noise'). Runner: refuses to run
    an ancestral scheduler until its noise table has been written."""
    from trtkit.errors import TrtkitError

    r = LoopRunner(CopyExecutor(), device="cuda")
    with pytest.raises(TrtkitError, match="needs noise"):
        r(SHAPE, _tab("euler_a", 5), x_init=_x(), guidance=2.0)
