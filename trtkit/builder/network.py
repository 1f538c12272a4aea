"""The TensorRT side of a build: network, ONNX parser (errors with node names), I/O description,
optimization profiles, builder-config settings. Every function takes the backend's module (`trt`)
as given by `trtkit.backend.load_backend()`; names are feature-detected, never enum integers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtkit.builder.shapes import ProfileShapes
from trtkit.errors import TrtkitError
from trtkit.profiles import fmt_dims

if TYPE_CHECKING:  # the TensorRT 10 API as typed by stubs/ (never imported at run time)
    import tensorrt as trt_api

log = logging.getLogger(__name__)


class ParseError(TrtkitError):
    """TensorRT's ONNX parser rejected the model; `errors` holds every message (node, operator, reason)."""

    def __init__(self, path: Path, errors: list[str]) -> None:
        self.errors = errors
        first = errors[0] if errors else "no error message from the parser"
        more = f" (and {len(errors) - 1} more; --verbose lists them)" if len(errors) > 1 else ""
        super().__init__(f"TensorRT cannot parse {path.name}: {first}{more}")


def network_flags(backend: Any, strongly_typed: bool) -> int:
    """Creation flags as a bitmask built from enum names (their integer values moved in TRT 11)."""
    ndf = backend.trt.NetworkDefinitionCreationFlag
    # TensorRT 11 types strongly always and deprecates the flag; RTX and TRT 10 take it explicitly.
    if strongly_typed and hasattr(ndf, "STRONGLY_TYPED") and not (backend.name == "trt" and backend.major >= 11):
        return 1 << int(ndf.STRONGLY_TYPED)
    return 0


def describe_parser_error(err: Any) -> str:
    """'node <name> (<Op>): <reason>' from a ParserError (its accessors are methods)."""

    def call(attr: str) -> Any:
        fn = getattr(err, attr, None)
        try:
            return fn() if callable(fn) else fn
        except Exception:  # an accessor missing in one version must not hide the message
            return None

    desc = str(call("desc") or err).strip()
    name, op, node = call("node_name"), call("node_operator"), call("node")
    if name or op:
        where = f"node {name or '#' + str(node)} ({op or '?'})"
    elif isinstance(node, int) and node >= 0:
        where = f"node #{node}"
    else:
        where = "model"
    return f"{where}: {desc}"


def parse_onnx(backend: Any, network: trt_api.INetworkDefinition, path: Path) -> trt_api.OnnxParser:
    """Parse with `parse_from_file`, so external data (models over 2 GB) is read from beside the file.

    Returns the parser, which must stay alive as long as the network (it owns the weights).
    """
    trt = backend.trt
    parser: trt_api.OnnxParser = trt.OnnxParser(network, backend.logger)
    # Native InstanceNormalization: the exporter turns GroupNorm into InstanceNormalization+Reshape.
    if hasattr(trt, "OnnxParserFlag") and hasattr(trt.OnnxParserFlag, "NATIVE_INSTANCENORM"):
        parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
    ok = parser.parse_from_file(str(path))
    errors = [describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    if not ok or errors:
        for e in errors:
            log.error("ONNX parser: %s", e)
        raise ParseError(path, errors)
    if network.num_layers == 0:
        raise TrtkitError(f"TensorRT parsed {path.name} into an empty network")
    return parser


def _dtype_name(dt: Any) -> str:
    return str(getattr(dt, "name", dt)).split(".")[-1].lower()


def network_io(network: trt_api.INetworkDefinition) -> dict[str, list[dict[str, Any]]]:
    """Input and output names, shapes (-1 = dynamic) and types, as TensorRT sees the network."""

    def one(t: trt_api.ITensor) -> dict[str, Any]:
        shape = t.shape
        return {"name": t.name, "shape": [int(shape[i]) for i in range(len(shape))], "dtype": _dtype_name(t.dtype)}

    return {"inputs": [one(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [one(network.get_output(i)) for i in range(network.num_outputs)]}


def add_profiles(trt: Any, builder: trt_api.Builder, config: trt_api.IBuilderConfig, network: trt_api.INetworkDefinition,
                 profiles: list[ProfileShapes]) -> None:
    """One optimization profile per ProfileShapes, checked against the parsed network's inputs."""
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    for p in profiles:
        prof: trt_api.IOptimizationProfile = builder.create_optimization_profile()
        for name, rng in p.shapes.items():
            t = inputs.get(name)
            if t is None:
                raise TrtkitError(f"profile {p.name}: {name!r} is not an input of the network; "
                                  f"its inputs are: {', '.join(inputs)}")
            try:
                if t.is_shape_tensor:
                    prof.set_shape_input(name, list(rng.min), list(rng.opt), list(rng.max))
                else:
                    prof.set_shape(name, trt.Dims(list(rng.min)), trt.Dims(list(rng.opt)), trt.Dims(list(rng.max)))
            except (RuntimeError, ValueError, TypeError) as e:  # the doc says ValueError, the binding raises RuntimeError
                raise TrtkitError(f"profile {p.name}: TensorRT rejects the shapes of {name!r} (min "
                                  f"{fmt_dims(rng.min)}, opt {fmt_dims(rng.opt)}, max {fmt_dims(rng.max)}): {e}") from e
        if config.add_optimization_profile(prof) < 0:
            raise TrtkitError(f"profile {p.name}: TensorRT rejects it as invalid (check every dynamic input has shapes)")


def set_rtx_targets(backend: Any, config: Any, targets: tuple[str, ...]) -> None:
    """TensorRT-RTX ahead-of-time targets; () keeps its portable default. (`config` is an RTX builder
    config: these members are not in TensorRT's API, so not in the stubs.)"""
    from trtkit.builder.config import RTX_TARGETS

    if not targets:
        return
    cc = backend.trt.ComputeCapability
    missing = [t for t in targets if not hasattr(cc, RTX_TARGETS[t])]
    if missing:
        raise TrtkitError(f"this TensorRT-RTX ({backend.version}) cannot target compute capability {missing[0]}")
    config.num_compute_capabilities = len(targets)
    for i, t in enumerate(targets):
        if not config.set_compute_capability(getattr(cc, RTX_TARGETS[t]), i):  # returns bool, does not raise
            raise TrtkitError(f"TensorRT-RTX {backend.version} refused target compute capability {t} "
                              f"(target {i + 1} of {len(targets)}; 'current' must be the only target)")
