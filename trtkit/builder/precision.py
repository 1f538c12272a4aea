"""The graph the builder hands TensorRT, by precision: which checks an ONNX's Q/DQ and the requested
precision must pass, the Q/DQ pass and FP16 conversion that prepare it (strongly typed backends), the
TensorRT 10 precision flags, and the label of what the engine runs in.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trtkit._files import check_input
from trtkit.builder.config import EIGHT_BIT, BuildConfig
from trtkit.builder.outputs import qdq_onnx_path
from trtkit.builder.shapes import ProfileShapes
from trtkit.builder.source import OnnxSource, read_onnx
from trtkit.errors import TrtkitError

CALIBRATE_HINT = ("calibrate first: trtkit calibrate MODEL_DIR -o calib.json, then pass --calib calib.json "
                  "(or give an ONNX that already has Q/DQ nodes)")


def strongly_typed(backend: Any) -> bool:
    # TensorRT 11 and TensorRT-RTX removed the precision flags: types come from the graph.
    return bool(backend.strongly_typed_only or backend.major >= 11)


def check_precision(config: BuildConfig, source: OnnxSource, notes: list[str]) -> None:
    if config.calib is not None:
        check_input(config.calib, "calibration file")
    if config.precision not in EIGHT_BIT:
        if source.has_qdq:
            notes.append(f"the ONNX already has {'/'.join(source.qdq_types)} Q/DQ nodes: an "
                         f"{'/'.join(source.qdq_types)} engine (its Q/DQ are built as given)")
        return
    if source.has_qdq:
        if config.precision not in source.qdq_types:
            raise TrtkitError(f"{source.path.name} already has {'/'.join(source.qdq_types)} Q/DQ nodes, not "
                              f"{config.precision}; build it with --{source.qdq_types[0]} or start from the "
                              "unquantized ONNX")
        notes.append(f"the ONNX already has {config.precision} Q/DQ nodes: Q/DQ pass skipped"
                     + ("; --calib ignored" if config.calib else ""))
        return
    if config.precision == "int8" and config.calib is None:
        raise TrtkitError(f"--int8 needs calibration for {source.path.name}, which has no Q/DQ nodes; {CALIBRATE_HINT}")


def engine_precision(config: BuildConfig, source: OnnxSource) -> str:
    """What the engine runs in, for labels: the requested precision, or the Q/DQ type of an ONNX that
    already has Q/DQ and was built without --int8/--fp8 (it is 8-bit whatever the flag)."""
    if config.precision in EIGHT_BIT or not source.has_qdq:
        return config.precision
    return "/".join(source.qdq_types)


def prepare_onnx(config: BuildConfig, backend: Any, source: OnnxSource, profiles: list[ProfileShapes],
                  work: Path, notes: list[str], say: Callable[[str], None]) -> OnnxSource:
    """The graph TensorRT will parse: the Q/DQ pass and/or FP16 conversion where the precision needs them."""
    path = source.path
    fp16 = config.precision == "fp16" or (config.precision in EIGHT_BIT and fp16_rest(config, source))
    if config.precision in EIGHT_BIT and not source.has_qdq:
        preset = next((p.name for p in profiles if ":" not in p.name and p.name in config.profiles), None)
        say(f"{config.precision} Q/DQ pass (trtkit.graph.qdq)")
        # Both passes write the kept name (in two folders), so the last one's external data file is
        # already named as it will be beside the plan.
        (work / "qdq").mkdir()
        path, fp16_done = _quantize(config, path, work / "qdq" / qdq_onnx_path(config).name, fp16, preset)
        notes.append(f"{config.precision} Q/DQ pass applied" + (f" with {config.calib.name}" if config.calib else "")
                     + (", the rest converted to FP16" if fp16_done else ""))
        fp16 = fp16 and not fp16_done
    if fp16 and strongly_typed(backend):
        say("FP16 graph conversion (trtkit.graph.fp16)")
        path = _convert_fp16(path, work / (qdq_onnx_path(config).name if path != source.path else "model.fp16.onnx"))
        notes.append("FP16 graph conversion applied (strongly typed network)")
    return source if path == source.path else read_onnx(path)


def fp16_rest(config: BuildConfig, source: OnnxSource) -> bool:
    if config.fp16_base is not None:
        return config.fp16_base
    return config.precision in EIGHT_BIT and not source.has_qdq


def _quantize(config: BuildConfig, onnx_path: Path, output: Path, fp16: bool,
              preset: str | None) -> tuple[Path, bool]:
    """Run the Q/DQ pass; (its output, whether it also converted the rest to FP16)."""
    try:
        from trtkit.graph.qdq import QuantizeConfig, quantize
    except ImportError as e:
        raise TrtkitError(f"--{config.precision} needs the Q/DQ pass (trtkit.graph.qdq), which this install "
                          f"lacks ({e})") from e
    kw: dict[str, Any] = dict(onnx_path=onnx_path, output=output, precision=config.precision, calib=config.calib)
    if config.quant_level is not None:
        kw["level"] = config.quant_level
    # Optional knobs of the pass, passed where it has them: FP16 for the rest in the same pass, and
    # the profile whose sample inputs it runs when it calibrates by itself.
    fields = {f.name for f in dataclasses.fields(QuantizeConfig)}
    if "fp16" in fields:
        kw["fp16"] = fp16
    if "profile" in fields and preset is not None:
        kw["profile"] = preset
    result = quantize(QuantizeConfig(**kw))
    return _result_path(result, output), bool(kw.get("fp16"))


def _convert_fp16(onnx_path: Path, output: Path) -> Path:
    try:
        from trtkit.graph.fp16 import convert_fp16
    except ImportError as e:
        raise TrtkitError(f"FP16 on a strongly typed backend needs the FP16 conversion (trtkit.graph.fp16), "
                          f"which this install lacks ({e})") from e
    return _result_path(convert_fp16(onnx_path, output), output)


def _result_path(result: Any, default: Path) -> Path:
    if isinstance(result, (str, os.PathLike)):
        return Path(result)
    for attr in ("path", "output"):
        value = getattr(result, attr, None)
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
    return default


def precision_flags(config: BuildConfig, backend: Any, source: OnnxSource, graph: OnnxSource) -> list[str]:
    """TensorRT 10 builder flags: what the user asked for plus the types of the Q/DQ in the graph."""
    if strongly_typed(backend):
        return []
    want: list[str] = []
    if config.precision == "fp16" or fp16_rest(config, source):
        want.append("FP16")
    for t in ({config.precision} & set(EIGHT_BIT)) | set(graph.qdq_types):
        want.append(t.upper())
    flags = [f for f in dict.fromkeys(want) if f in backend.precision_flags]
    missing = [f for f in dict.fromkeys(want) if f not in backend.precision_flags]
    if missing:
        raise TrtkitError(f"TensorRT {backend.version} has no {'/'.join(missing)} builder flag")
    return flags
