"""Torch-free executors made of cuda-python calls, for the graph-runner tests (imported by them)."""

from __future__ import annotations

from typing import Any

import numpy as np

from trtkit.runtime.executors import UNET_OUTPUT, LoopShape, StepExecutor


class CopyExecutor(StepExecutor):
    """A stand-in UNet with no torch: noise_pred = sample (a cuMemcpyDtoDAsync on the loop's stream), so
    the loop's math is known exactly: m = x * in_scale[i]. Captures like a TensorRT engine would (cuda-python)."""

    name = "copy"
    io_dtype = "float32"

    def __init__(self) -> None:
        self.arrays: dict[str, Any] = {}
        self.calls = 0

    def check_shape(self, shape: LoopShape) -> None:
        pass

    def bind(self, arrays: dict[str, Any]) -> None:
        self.arrays = dict(arrays)

    def __call__(self, stream: int) -> None:
        self.calls += 1
        src, dst = self.arrays["sample"], self.arrays[UNET_OUTPUT]
        if isinstance(src, np.ndarray):
            dst[...] = src
            return
        from cuda.bindings import driver as cu

        from trtkit.runtime.cuda import check

        check(cu.cuMemcpyDtoDAsync(dst.ptr, src.ptr, src.nbytes, stream))


class HostSyncExecutor(CopyExecutor):
    """Synchronises the stream inside the step: legal eagerly, illegal while capturing."""

    def __call__(self, stream: int) -> None:
        super().__call__(stream)
        from cuda.bindings import driver as cu

        from trtkit.runtime.cuda import check

        check(cu.cuStreamSynchronize(stream))


SHAPE = LoopShape(batch=1, latent_channels=4, latent_height=16, latent_width=24, cfg=True, text_len=77,
                  text_dim=64, pooled_dim=32, time_ids_dim=6)


def reference_copy_loop(tables: Any, x_init: np.ndarray, guidance: float, cfg: bool,
                        noise: np.ndarray | None) -> np.ndarray:
    """The numpy loop for CopyExecutor (m = u = c = scaled input, so guidance cancels out)."""
    from trtkit.runtime.schedulers import LoopState, reference_step

    st = LoopState(x=x_init.astype(np.float32), x0_prev=np.zeros_like(x_init, np.float32))
    for i in range(tables.steps):
        s = st.x * tables.in_scale[i]
        out = np.concatenate([s, s]) if cfg else s
        reference_step(tables, i, st, out, guidance, cfg, None if noise is None else noise[i])
    return st.x
