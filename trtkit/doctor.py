"""`trtkit doctor`: the self-check a user with TensorRT runs first, and sends with a bug report.

It builds a tiny engine with trtkit's own builder (an ONNX made here: Conv, Relu, Flatten, MatMul, Add with a
dynamic batch), deserializes and runs it through trtkit's runtime Engine, captures one execution in a CUDA
graph and replays it on new input, and compares both results with onnxruntime. Each check is one line:
ok, failed (with why), or skipped (with why it does not apply on this machine).

What decides (which checks apply, the tolerance, the verdict) is plain functions over data, tested on the
CPU; what needs a GPU (`_gpu_checks`) is kept short and only calls the runtime's own helpers.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trtkit.errors import TrtkitError

# The tiny model: x[B, 4, 16, 16] -> Conv(4->8, 3x3, pad 1) -> Relu -> Flatten -> MatMul(2048x16) + b -> y[B, 16]
IN_SHAPE = (4, 16, 16)
OUT_FEATURES = 16
BATCH = {"min": 1, "opt": 2, "max": 4}
RUN_BATCH = 3  # inside the profile, not its opt shape: the dynamic batch really is dynamic
GRAPH_BATCH = 2
# FP32 engines: TensorRT may use TF32 for Conv/MatMul (on by default), ~1e-3 relative; a wrong binding or a
# stale graph is off by O(1).
RTOL = 1e-2

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
CHECKS = ("backend", "gpu", "build", "deserialize", "run", "cuda_graph", "match")
RUNTIME_CHECKS = ("deserialize", "run", "cuda_graph", "match")


@dataclass
class Check:
    name: str
    status: str  # ok | failed | skipped
    detail: str
    seconds: float | None = None


@dataclass
class DoctorReport:
    checks: list[Check]
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return verdict(self.checks)[0]

    @property
    def summary(self) -> str:
        return verdict(self.checks)[1]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "summary": self.summary, "environment": self.environment,
                "checks": [asdict(c) for c in self.checks]}


def applicable(backend: str | None, gpu: str | None, can_run: bool, why_not_run: str) -> dict[str, str | None]:
    """Which checks apply here: check name -> None (run it) or the reason it is skipped.

    `backend` None: none loaded (the backend check failed). Full TensorRT builds only on a GPU; TensorRT-RTX
    builds on the CPU (ahead of time) and runs only on the GPUs it supports.
    """
    out: dict[str, str | None] = dict.fromkeys(CHECKS)
    if backend is None:
        return {n: (None if n == "backend" else "no TensorRT backend") for n in CHECKS}
    if backend == "trt" and gpu is None:
        out["build"] = f"TensorRT builds on a GPU and there is none ({why_not_run or 'no CUDA GPU'})"
    if not can_run:
        label = "TensorRT-RTX" if backend == "rtx" else "TensorRT"
        reason = f"running engines needs a GPU that {label} supports ({why_not_run or 'no CUDA GPU'})"
        for n in RUNTIME_CHECKS:
            out[n] = reason
    return out


def plan_targets_for(backend: str, gpu: str | None, cc: tuple[int, int] | None) -> tuple[str, ...]:
    """--target-cc of the doctor's RTX build: its portable default, except on a Turing GPU, which runs only plans
    built for 7.5 (backend.rtx_runs_on)."""
    return ("7.5",) if backend == "rtx" and gpu is not None and cc == (7, 5) else ()


def runs_doctor_plan(backend: str, gpu: str | None, cc: tuple[int, int] | None, can_run: bool) -> bool:
    """Whether the doctor's own plan can run here: the backend's verdict, or RTX on Turing with a 7.5 plan."""
    from trtkit.backend import rtx_runs_on

    if backend != "rtx" or gpu is None:
        return can_run
    return rtx_runs_on(cc, list(plan_targets_for(backend, gpu, cc)) or None)[0]


def max_error(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |out - ref|, the tolerance it is held to: RTOL x the reference's largest magnitude, at least RTOL)."""
    if out.shape != ref.shape:
        raise TrtkitError(f"output shape {out.shape}, onnxruntime gives {ref.shape}")
    err = float(np.max(np.abs(out.astype(np.float64) - ref.astype(np.float64)))) if out.size else 0.0
    return err, RTOL * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)


def verdict(checks: list[Check]) -> tuple[bool, str]:
    """(all needed checks passed, one summary line). Skipped checks do not fail: they say what this machine
    cannot do; a failed one is named first."""
    failed = [c for c in checks if c.status == FAILED]
    by = {c.name: c for c in checks}
    if failed:
        return False, f"{len(failed)} check(s) failed: {', '.join(c.name for c in failed)} ({failed[0].detail})"
    ran = [c.name for c in checks if c.status == OK and c.name in RUNTIME_CHECKS]
    if "build" in by and by["build"].status == OK and len(ran) == len(RUNTIME_CHECKS):
        return True, "all checks passed: this machine builds and runs TensorRT engines through trtkit"
    if "build" in by and by["build"].status == OK:
        why = next((c.detail for c in checks if c.name in RUNTIME_CHECKS and c.status == SKIPPED), "")
        return True, f"builds work here; {why}"
    why = by["build"].detail if "build" in by else "nothing was checked"
    return True, f"nothing to build or run here: {why}"


def make_onnx(path: Path, seed: int = 0) -> Path:
    """The doctor's model, with seeded weights (scaled so the output is O(1))."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c_in, h, w = IN_SHAPE
    conv_w = (rng.standard_normal((8, c_in, 3, 3)) / np.sqrt(c_in * 9)).astype(np.float32)
    conv_b = (0.1 * rng.standard_normal(8)).astype(np.float32)
    fc_w = (rng.standard_normal((8 * h * w, OUT_FEATURES)) / np.sqrt(8 * h * w)).astype(np.float32)
    fc_b = (0.1 * rng.standard_normal(OUT_FEATURES)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="/doctor/conv/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="/doctor/act/Relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="/doctor/flatten/Flatten", axis=1),
             helper.make_node("MatMul", ["f", "fc_w"], ["m"], name="/doctor/fc/MatMul"),
             helper.make_node("Add", ["m", "fc_b"], ["y"], name="/doctor/fc/Add")]
    inits = [numpy_helper.from_array(a, n) for a, n in ((conv_w, "conv_w"), (conv_b, "conv_b"), (fc_w, "fc_w"),
                                                         (fc_b, "fc_b"))]
    graph = helper.make_graph(nodes, "trtkit_doctor",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *IN_SHAPE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT_FEATURES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime trtkit supports
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def reference(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["y"], {"x": x})[0])


def _shapes(batch: int) -> str:
    return "x:" + "x".join(str(d) for d in (batch, *IN_SHAPE))


def _timed(name: str, fn: Callable[[], str]) -> Check:
    t0 = time.perf_counter()
    try:
        detail = fn()
    except Exception as e:  # a check's failure is its result, reported in one line
        msg = " ".join(str(e).split()) or type(e).__name__
        return Check(name, FAILED, f"{type(e).__name__}: {msg}" if not isinstance(e, TrtkitError) else msg,
                     round(time.perf_counter() - t0, 3))
    return Check(name, OK, detail, round(time.perf_counter() - t0, 3))


def environment(be: Any | None) -> dict[str, Any]:
    import trtkit

    env: dict[str, Any] = {"trtkit": trtkit.__version__, "python": sys.version.split()[0],
                           "platform": platform.platform()}
    if be is not None:
        env["backend"] = be.describe()
    return env


def run_checks(backend: str | None = None, workdir: Path | None = None,
               say: Callable[[Check], None] | None = None) -> DoctorReport:
    """Every check that applies here, in order; `say` sees each result as it comes."""
    from trtkit.backend import available, load_backend

    checks: list[Check] = []

    def add(c: Check) -> None:
        checks.append(c)
        if say is not None:
            say(c)

    be: Any = None
    try:
        be = load_backend(backend)
        others = [b for b in available() if b != be.name]
        add(Check("backend", OK, f"{be.trt.__name__} {be.version}" + ("" if not others else
                                                                     f" (also installed: {', '.join(others)})")))
    except TrtkitError as e:
        add(Check("backend", FAILED, str(e)))
    runnable = be is not None and runs_doctor_plan(be.name, be.gpu, be.compute_capability, be.can_run)
    todo = applicable(be.name if be else None, be.gpu if be else None, runnable, be.why_not_run if be else "")
    if be is not None:
        gpu_line = f"{be.gpu}" + (f"; {be.why_not_run}" if be.gpu and not be.can_run else "")
        add(Check("gpu", OK, gpu_line) if be.gpu else Check("gpu", SKIPPED, be.why_not_run or "no CUDA GPU"))
    with tempfile.TemporaryDirectory(prefix="trtkit-doctor-", dir=workdir) as tmp:
        onnx_path = make_onnx(Path(tmp) / "doctor.onnx")
        plan = Path(tmp) / "doctor.plan"
        reason = todo["build"]
        build_check = Check("build", SKIPPED, reason) if reason else _timed("build", lambda: _build(be, onnx_path, plan))
        add(build_check)
        skip = {n: todo[n] or ("no engine: the build did not succeed" if build_check.status != OK else None)
                for n in RUNTIME_CHECKS}
        if any(skip.values()):
            for n in RUNTIME_CHECKS:
                add(Check(n, SKIPPED, str(skip[n] or "skipped with the others")))
        else:
            for c in _gpu_checks(be, plan, onnx_path):
                add(c)
    return DoctorReport(checks, environment(be))


def _build(be: Any, onnx_path: Path, plan: Path) -> str:
    from trtkit.builder.build import build
    from trtkit.builder.config import BuildConfig

    targets = plan_targets_for(be.name, be.gpu, be.compute_capability)
    r = build(BuildConfig(onnx=onnx_path, output=plan, min_shapes=_shapes(BATCH["min"]),
                          opt_shapes=_shapes(BATCH["opt"]), max_shapes=_shapes(BATCH["max"]), backend=be.name,
                          target_cc=targets, progress=False, force=True))
    meta = json.loads(r.metadata.read_text())
    where = (f"ahead of time for compute capability {', '.join(meta['target']['compute_capabilities'])}"
             if be.is_rtx else f"for {meta['target']['gpu']}")
    return f"{r.plan.stat().st_size / 1024:.0f} KiB plan {where}, batch {BATCH['min']}..{BATCH['max']}, " \
           f"{r.build_seconds:.1f} s"


def _gpu_checks(be: Any, plan: Path, onnx_path: Path) -> list[Check]:
    """Deserialize, run, capture + replay, compare: only trtkit's runtime helpers (Engine, cuda)."""
    from trtkit.runtime import cuda
    from trtkit.runtime.engine import Engine

    out: list[Check] = []
    rng = np.random.default_rng(1)
    engine_box: list[Any] = []
    out.append(_timed("deserialize", lambda: _load(Engine, plan, be.name, engine_box)))
    if out[-1].status != OK:
        return out + [Check(n, SKIPPED, "the engine did not load") for n in ("run", "cuda_graph", "match")]
    engine = engine_box[0]
    stream = cuda.Stream()
    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def run() -> str:
        x = rng.standard_normal((RUN_BATCH, *IN_SHAPE)).astype(np.float32)
        y = engine.infer({"x": x}, stream.handle)["y"]
        results["run"] = (y, reference(onnx_path, x))
        return f"batch {RUN_BATCH} -> y {tuple(y.shape)}"

    def graph() -> str:
        x_dev = cuda.DeviceArray.empty((GRAPH_BATCH, *IN_SHAPE), np.float32)
        y_dev = cuda.DeviceArray.empty((GRAPH_BATCH, OUT_FEATURES), np.float32)
        engine.bind({"x": x_dev, "y": y_dev})
        x_dev.upload(rng.standard_normal(x_dev.shape).astype(np.float32), stream.handle)
        engine.execute(stream.handle)  # warm-up: first-run allocations stay out of the capture
        stream.synchronize()
        capturable = getattr(engine.context, "is_stream_capturable", None)  # TensorRT-RTX
        if capturable is not None and not capturable(stream.handle):
            raise TrtkitError("TensorRT-RTX says this context cannot be captured on this stream "
                              "(is_stream_capturable is False)")
        g = cuda.CudaGraph()
        g.begin(stream)
        try:
            engine.execute(stream.handle)
        except Exception:
            g.abort(stream)
            raise
        g.end(stream)
        x = rng.standard_normal(x_dev.shape).astype(np.float32)  # new values, same buffer: what a replay sees
        x_dev.upload(x, stream.handle)
        g.launch(stream.handle)
        stream.synchronize()
        results["cuda_graph"] = (y_dev.download(stream.handle), reference(onnx_path, x))
        g.close()
        return f"captured one execution at batch {GRAPH_BATCH} and replayed it on new input"

    out.append(_timed("run", run))
    out.append(_timed("cuda_graph", graph))

    def match() -> str:
        if not results:
            raise TrtkitError("nothing ran to compare")
        parts, bad = [], []
        for what, (y, ref) in results.items():
            err, tol = max_error(y, ref)
            parts.append(f"{what}: max abs error {err:.2e} (tolerance {tol:.1e})")
            if not err <= tol:
                bad.append(what)
        if bad:
            raise TrtkitError(f"differs from onnxruntime: {'; '.join(parts)}")
        return "vs onnxruntime: " + "; ".join(parts)

    out.append(_timed("match", match))
    stream.close()
    return out


def _load(engine_cls: Any, plan: Path, backend: str, box: list[Any]) -> str:
    engine = engine_cls.load(plan, backend=backend)
    box.append(engine)
    return f"{plan.name}: inputs {', '.join(engine.inputs)}, outputs {', '.join(engine.outputs)}"
