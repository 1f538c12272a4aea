"""Capture/replay of the whole loop against the eager loop; the engine path loads no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from runtime_fakes import SHAPE, CopyExecutor, reference_copy_loop

from trtkit.runtime.graph_runner import LoopRunner
from trtkit.runtime.schedulers import SCHEDULERS, draw_noise, make_scheduler, make_tables

BASE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon"}

NO_TORCH = """
import sys, numpy as np
sys.path.insert(0, {root!r})
import trtkit.runtime.engine, trtkit.runtime.graph_runner, trtkit.runtime.executors, trtkit.runtime.kernels
sys.path.insert(0, {root!r} + '/tests/runtime')
from runtime_fakes import CopyExecutor, SHAPE
from trtkit.runtime.graph_runner import LoopRunner
from trtkit.runtime.schedulers import StepTables
{run}
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'cupy'))
print('LOADED=' + ','.join(bad))
"""

RUN_ON_GPU = """
import pickle
tab = pickle.load(open({tab!r}, 'rb'))
r = LoopRunner(CopyExecutor(), device='cuda', use_graph=True)
x = np.random.default_rng(0).standard_normal(SHAPE.latent).astype(np.float32)
out = r(SHAPE, tab, x_init=x, guidance=3.0)
assert r.captures == 1 and np.isfinite(out).all()
"""


def _loaded(code: str) -> list[str]:
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("LOADED="))
    return [m for m in line[len("LOADED="):].split(",") if m]


def test_engine_path_imports_no_torch() -> None:
    root = str(Path(__file__).resolve().parents[2])
    assert _loaded(NO_TORCH.format(root=root, run="")) == []


@pytest.mark.gpu
def test_engine_path_captures_without_torch(tmp_path: Path) -> None:
    """A torch-free executor (cuda-python copies, as a TensorRT engine would enqueue) captured with
    cuStreamBeginCapture: the whole process never imports torch."""
    import pickle

    tab = make_tables(make_scheduler("dpmpp_2m", BASE), 10, "dpmpp_2m")
    p = tmp_path / "tab.pkl"
    p.write_bytes(pickle.dumps(tab))
    root = str(Path(__file__).resolve().parents[2])
    assert _loaded(NO_TORCH.format(root=root, run=RUN_ON_GPU.format(tab=str(p)))) == []


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_cuda_python_graph_equals_eager_and_reference(name: str) -> None:
    tab = make_tables(make_scheduler(name, BASE), 30, name)
    x = np.random.default_rng(1).standard_normal(SHAPE.latent).astype(np.float32) * tab.init_noise_sigma
    noise = draw_noise(tab, SHAPE.latent, 4)
    eager = LoopRunner(CopyExecutor(), device="cuda", use_graph=False)(SHAPE, tab, x_init=x, guidance=5.0,
                                                                         noise=noise)
    graph = LoopRunner(CopyExecutor(), device="cuda", use_graph=True)(SHAPE, tab, x_init=x, guidance=5.0,
                                                                        noise=noise)
    np.testing.assert_array_equal(graph, eager)  # same kernels, same order: bit-identical
    ref = reference_copy_loop(tab, x, 5.0, True, noise)
    np.testing.assert_allclose(graph, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


class UncapturableCopy(CopyExecutor):
    """What TensorRT-RTX answers for a context that would allocate under capture: is_stream_capturable false."""

    def capturable(self, stream: int) -> bool:
        return False


@pytest.mark.gpu
def test_uncapturable_executor_runs_eagerly(caplog: pytest.LogCaptureFixture) -> None:
    """Finding 4: the runner asks before capturing; a "no" gives one warning and the eager loop's latents."""
    tab = make_tables(make_scheduler("euler", BASE), 6, "euler")
    x = np.random.default_rng(1).standard_normal(SHAPE.latent).astype(np.float32) * tab.init_noise_sigma
    eager = LoopRunner(CopyExecutor(), device="cuda", use_graph=False)(SHAPE, tab, x_init=x, guidance=5.0)
    r = LoopRunner(UncapturableCopy(), device="cuda", use_graph=True)
    with caplog.at_level("WARNING"):
        got = r(SHAPE, tab, x_init=x, guidance=5.0)
        again = r(SHAPE, tab, x_init=x, guidance=5.0)
    assert r.captures == 0 and not r.use_graph and r.graph is None
    assert sum("cannot be captured in a CUDA graph" in m for m in caplog.messages) == 1
    np.testing.assert_array_equal(got, eager)
    np.testing.assert_array_equal(again, eager)


@pytest.fixture(scope="module")
def gpu_pipe(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from trtkit.runtime.pipeline import Pipeline

    return Pipeline(tiny_model_dir, device="cuda", cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_torch_unet_graph_equals_eager_sdxl_arch(gpu_pipe, name: str) -> None:  # type: ignore[no-untyped-def]
    """The tiny SDXL-architecture UNet in fp16: the loop as one graph gives bit-identical latents to the
    same loop run eagerly (same kernels in the same order on the same stream)."""
    from trtkit.runtime.pipeline import encode, initial_latents

    p = gpu_pipe.pipe
    tab = make_tables(make_scheduler(name, p.scheduler.config), 20, name)
    cond, shape = encode(p, "a red cube", "", True, 256, 256, "cuda")
    x = initial_latents(shape, tab, 0)
    noise = draw_noise(tab, shape.latent, 1)
    eager = LoopRunner(gpu_pipe.executor, device="cuda", use_graph=False)(shape, tab, x_init=x, guidance=7.0,
                                                                           noise=noise, **cond)
    r = LoopRunner(gpu_pipe.executor, device="cuda", use_graph=True)
    graph = r(shape, tab, x_init=x, guidance=7.0, noise=noise, **cond)
    assert r.captures == 1 and np.isfinite(graph).all()
    np.testing.assert_array_equal(graph, eager)
