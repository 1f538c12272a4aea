"""The demo's build stage: the quantized (or plain) tiny UNet or FLUX transformer to a plan with whatever backend is here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trtkit.errors import TrtkitError


def _pick_backend() -> Any:
    from trtkit.backend import available, load_backend

    try:
        backend = load_backend()
    except TrtkitError as e:
        from trtkit.demo import Skipped

        raise Skipped(f"no TensorRT backend: {e}") from e
    if not backend.is_rtx and backend.gpu is None:
        if "rtx" in available():  # full TensorRT needs a GPU to build; TensorRT-RTX builds on the CPU
            return load_backend("rtx")
        from trtkit.demo import Skipped

        raise Skipped(f"TensorRT {backend.version} needs a GPU to build and there is none")
    return backend


def _target(backend: Any) -> tuple[str, ...]:
    if not backend.is_rtx:
        return ()
    from trtkit.builder.config import RTX_TARGETS

    cc = backend.compute_capability
    if backend.can_run and cc is not None and f"{cc[0]}.{cc[1]}" in RTX_TARGETS:
        return (f"{cc[0]}.{cc[1]}",)  # the local GPU, so the run stage can use the plan
    return ("8.9",)  # one CPU-side target keeps the build short


def demo_stage(state: Any) -> tuple[str, list[Path]]:
    from trtkit.builder.build import build
    from trtkit.builder.config import BuildConfig
    from trtkit.builder.source import read_onnx
    from trtkit.demo import Skipped

    onnx = state.quantized or state.onnx
    if onnx is None:
        raise Skipped("no ONNX from the export stage")
    backend = _pick_backend()
    qdq = read_onnx(onnx).qdq_types
    if qdq:
        precision = qdq[0]
    else:
        try:
            import trtkit.graph.fp16  # noqa: F401
            precision = "fp16"
        except ImportError:
            precision = "fp32"
    from trtkit.builder.progress import quiet_tensorrt_log

    out = Path(state.config.workdir) / "engines" / f"{state.model.component}.plan"
    with quiet_tensorrt_log():  # the demo shows one line per stage, not TensorRT's per-layer warnings
        r = build(BuildConfig(onnx=onnx, output=out, profiles=(state.config.profile,), precision=precision,
                              backend=backend.name, target_cc=_target(backend), progress=False))
    state.engine = r.plan
    where = f"targets {', '.join(_target(backend))}" if backend.is_rtx else backend.gpu
    how = "cache hit" if r.cached else f"built in {r.build_seconds:.1f} s"
    return (f"{r.plan.name} ({r.plan.stat().st_size / 2**20:.1f} MiB, {precision}, {backend.name} {backend.version}, "
            f"{where}), {how}", [r.plan, r.metadata] + ([r.layers] if r.layers else []))
