"""`trtkit demo`: the embedded default. Chains every stage that exists on a tiny SDXL-architecture
model (or, `--model flux`, a tiny guidance-distilled FLUX.1-dev-architecture one), on whatever this machine
has (CPU only is enough), and says what it did and where the files are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtkit.errors import TrtkitError


class Skipped(Exception):
    """A stage that cannot run on this machine (no backend, no GPU): reported, not fatal."""


@dataclass(frozen=True)
class DemoModel:
    """What differs between the demo's models; every stage is the same product function for both."""

    label: str  # in the stage lines: "UNet" | "FLUX transformer"
    component: str  # the denoiser's folder, ONNX and plan name: "unet" | "transformer"
    # The UNet demo quantizes INT8 (trtkit's default, any TensorRT GPU). FLUX takes FP8 level 4: the
    # precision NVIDIA ships FLUX.1 in, it quantizes the fused attention too (where a DiT spends its time),
    # and its max calibration needs no SmoothQuant (docs/quantization.md, "DiT transformers").
    precision: str
    guidance: float  # FLUX.1-dev's embedded guidance is its pipeline's default, 3.5; the UNet's CFG scale 7.5
    description: str


MODELS: dict[str, DemoModel] = {
    "unet": DemoModel("UNet", "unet", "int8", 7.5, "tiny SDXL-architecture pipeline"),
    "flux": DemoModel("FLUX transformer", "transformer", "fp8", 3.5,
                      "tiny guidance-distilled FLUX.1-dev-architecture pipeline"),
}


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path("trtkit-demo")
    model: str = "unet"  # a key of MODELS
    seed: int = 0
    profile: str = "tiny-256"
    prompt: str = "a photo of an astronaut riding a horse"
    steps: int = 8


@dataclass
class StageResult:
    name: str
    status: str  # "done" | "skipped" | "failed"
    message: str
    seconds: float
    files: list[Path] = field(default_factory=list)


@dataclass
class DemoState:
    config: DemoConfig
    model_dir: Path | None = None
    onnx: Path | None = None
    calib: Path | None = None
    quantized: Path | None = None
    engine: Path | None = None
    image: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> DemoModel:
        return MODELS[self.config.model]


def _stage_model(s: DemoState) -> tuple[str, list[Path]]:
    out = s.config.workdir / "model"
    if s.config.model == "flux":
        from trtkit.tiny_dit import make_tiny_dit_pipeline

        s.model_dir = make_tiny_dit_pipeline("flux", out, seed=s.config.seed)
    else:
        from trtkit.tiny import make_tiny_pipeline

        s.model_dir = make_tiny_pipeline(out, seed=s.config.seed)
    return f"{s.model.description} (seeded random weights) saved with save_pretrained", [s.model_dir]


def _stage_export(s: DemoState) -> tuple[str, list[Path]]:
    from trtkit.exporter import ExportConfig, export

    assert s.model_dir is not None
    r = export(ExportConfig(model_dir=s.model_dir, component=s.model.component, profile=s.config.profile,
                            out_dir=s.config.workdir / "onnx"))
    s.onnx = r.path
    return (f"{s.model.label} to ONNX ({r.num_params / 1e6:.1f} M parameters), onnxruntime vs torch max abs error "
            f"{r.max_abs_err:.2g}", [r.path])


StageFn = Callable[[DemoState], tuple[str, list[Path]]]

# Later stages live beside the code they drive ("module:function"), each raising Skipped when this
# machine cannot run it (no backend, no GPU).
STAGES: list[tuple[str, StageFn | str]] = [
    ("model", _stage_model),
    ("export", _stage_export),
    ("calibrate", "trtkit.calibration.demo_stage:demo_stage"),
    ("quantize", "trtkit.graph.demo_stage:demo_stage"),
    ("build", "trtkit.builder.demo_stage:demo_stage"),
    ("inspect", "trtkit.inspector.demo_stage:demo_stage"),
    ("run", "trtkit.runtime.demo_stage:demo_stage"),
]


def _resolve(fn: StageFn | str) -> StageFn:
    if callable(fn):
        return fn
    import importlib

    module, attr = fn.split(":")
    return getattr(importlib.import_module(module), attr)


def run_demo(config: DemoConfig, on_stage: Callable[[StageResult], None] | None = None) -> list[StageResult]:
    from trtkit._files import check_output_dir

    if config.model not in MODELS:
        raise TrtkitError(f"unknown demo model {config.model!r}; expected one of {', '.join(MODELS)}")
    check_output_dir(config.workdir, what="demo folder")  # before the first stage, not 4 s into it
    state = DemoState(config)
    results: list[StageResult] = []
    for name, fn in STAGES:
        t0 = time.perf_counter()
        try:
            msg, files = _resolve(fn)(state)
            res = StageResult(name, "done", msg, time.perf_counter() - t0, files)
        except Skipped as e:
            res = StageResult(name, "skipped", str(e), time.perf_counter() - t0)
        except TrtkitError as e:
            res = StageResult(name, "failed", str(e), time.perf_counter() - t0)
        results.append(res)
        if on_stage:
            on_stage(res)
        if res.status == "failed":
            raise TrtkitError(f"demo stage {name} failed: {res.message}")
    return results
