"""`BuildConfig`: everything one `trtkit build` needs, as one frozen object (CLI and Python alike)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from trtkit.errors import TrtkitError

PRECISIONS = ("fp32", "fp16", "int8", "fp8")
EIGHT_BIT = ("int8", "fp8")
# TensorRT-RTX compute-capability enum members by "major.minor" (SM90/SM100 do not exist there).
RTX_TARGETS = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121",
               "current": "CURRENT"}
# What we record when no --target-cc is given: TensorRT-RTX's own portable default (Ampere and later).
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0")
# FP8 needs Ada (8.9) or later; without --target-cc an FP8 build targets these.
FP8_DEFAULT_TARGETS = ("8.9", "12.0")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int | None) -> int | None:
    """'8G', '512M', '1.5GiB', '4096' -> bytes (binary units, as TensorRT's pool limits are)."""
    if text is None or isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if m is None:
        raise TrtkitError(f"cannot read size {text!r}; expected e.g. 8G, 512M or a number of bytes")
    unit = (m.group(2) or "").upper()[:1]
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise TrtkitError(f"size {text!r} must be positive")
    return n


def parse_target(text: str) -> str:
    """'8.9', 'sm89', 'SM_89', '89', 'current' -> the canonical '8.9' / 'current'."""
    t = text.strip().lower().replace("sm_", "").replace("sm", "")
    if t == "current":
        return t
    if re.fullmatch(r"\d{2,3}", t):
        t = f"{t[:-1]}.{t[-1]}"
    if t not in RTX_TARGETS:
        known = ", ".join(k for k in RTX_TARGETS if k != "current")
        raise TrtkitError(f"unknown target compute capability {text!r}; TensorRT-RTX targets {known} or current")
    return t


def fp8_gpu_error(precision: str, qdq_types: tuple[str, ...] | list[str], backend_name: str,
                  cc: tuple[int, int] | None) -> str | None:
    """Why full TensorRT cannot build FP8 on this GPU (FP8 kernels need Ada, 8.9, or later), or None.

    TensorRT builds for the GPU it runs on, so an FP8 build on an A100 or RTX 3090 would run the Q/DQ pass
    and then fail inside TensorRT. (RTX builds AOT for --target-cc instead: checked by build._rtx_targets.)
    """
    if backend_name != "trt" or cc is None or tuple(cc) >= (8, 9):
        return None
    if precision != "fp8" and "fp8" not in qdq_types:
        return None
    what = "--fp8" if precision == "fp8" else "this ONNX's FP8 Q/DQ"
    return (f"{what} needs a GPU of compute capability 8.9 or later (Ada, Hopper, Blackwell); this one is "
            f"{cc[0]}.{cc[1]}: use --int8 or --fp16 here, or build FP8 with --backend rtx --target-cc 8.9")


@dataclass(frozen=True)
class BuildConfig:
    """One engine build. Paths may be str; they are normalised to Path.

    `profiles` holds preset names (`trtkit profiles`) or trtexec-style shape strings
    (`sample:2x4x32x32,...`, a fixed-shape profile of its own); one TensorRT optimization
    profile each. `shapes`/`min_shapes`/`opt_shapes`/`max_shapes` override every preset
    profile, or make the single profile when no preset is named.
    """

    onnx: Path
    output: Path
    profiles: tuple[str, ...] = ()
    shapes: str | None = None
    min_shapes: str | None = None
    opt_shapes: str | None = None
    max_shapes: str | None = None
    precision: str = "fp32"
    # int8/fp8: the unquantized rest in FP16. None: yes when the Q/DQ pass runs (NVIDIA's recipe,
    # trtexec --fp16 --int8), no for an ONNX that arrives with its Q/DQ (built as given).
    fp16_base: bool | None = None
    calib: Path | None = None
    quant_level: float | None = None  # Q/DQ pass level; None: the pass's default
    opt_level: int | None = None  # None: 4 for 8-bit builds, 3 otherwise
    timing_cache: Path | None = None
    workspace: int | str | None = None  # bytes or "8G"; None: TensorRT's default (all device memory)
    static: bool = False  # min = opt = max for every preset profile (its opt shapes)
    backend: str | None = None  # "trt" | "rtx" | None (auto)
    target_cc: tuple[str, ...] = ()  # TensorRT-RTX targets, e.g. ("8.9",); () = its portable default
    model_dir: Path | None = None  # where ModelDims come from; None: ONNX metadata trtkit.source
    refittable: bool = False  # BuilderFlag.REFIT: weights can be replaced later (trtkit refit --lora)
    force: bool = False
    verbose: bool = False
    progress: bool = True  # a progress bar on a terminal (log lines otherwise)
    save_layers: bool = True  # engine inspector JSON beside the plan where the backend can deserialize
    extra: tuple[tuple[str, str], ...] = field(default=())  # free-form notes stored in the metadata

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "onnx", Path(self.onnx))
        set_(self, "output", Path(self.output))
        if self.calib is not None:
            set_(self, "calib", Path(self.calib))
        if self.timing_cache is not None:
            set_(self, "timing_cache", Path(self.timing_cache))
        if self.model_dir is not None:
            set_(self, "model_dir", Path(self.model_dir))
        if isinstance(self.profiles, str):
            set_(self, "profiles", (self.profiles,))
        set_(self, "profiles", tuple(self.profiles))
        set_(self, "workspace", parse_size(self.workspace))
        set_(self, "target_cc", tuple(parse_target(t) for t in self.target_cc))
        if self.precision not in PRECISIONS:
            raise TrtkitError(f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise TrtkitError(f"optimization level {self.opt_level} is outside 0..5")
        if self.fp16_base and self.precision == "fp32":
            raise TrtkitError("fp16_base applies to int8/fp8 builds; for FP16 alone use precision 'fp16'")
        if self.precision == "fp8":
            low = [t for t in self.target_cc if t != "current" and float(t) < 8.9]
            if low:
                raise TrtkitError(f"FP8 needs compute capability 8.9 or later; drop --target-cc {' '.join(low)}")
        if "current" in self.target_cc and len(self.target_cc) > 1:
            raise TrtkitError("--target-cc current must be the only target")
        if self.output.suffix == ".json":
            raise TrtkitError(f"output {self.output} ends in .json, which is the metadata file; name the plan "
                              "e.g. engine.plan")

    @property
    def effective_opt_level(self) -> int:
        if self.opt_level is not None:
            return self.opt_level
        return 4 if self.precision in EIGHT_BIT else 3

    @property
    def workspace_bytes(self) -> int | None:
        return parse_size(self.workspace)

    @property
    def rtx_targets(self) -> tuple[str, ...]:
        """The compute capabilities a TensorRT-RTX build is asked for (() = its portable default)."""
        if self.target_cc:
            return self.target_cc
        return FP8_DEFAULT_TARGETS if self.precision == "fp8" else ()

    @property
    def metadata_path(self) -> Path:
        return self.output.with_suffix(".json")

    @property
    def layers_path(self) -> Path:
        return self.output.with_suffix(".layers.json")
