"""Q/DQ insertion: explicit INT8 / FP8 quantization of linear, conv and attention in an exported
diffusers ONNX, at the quantization levels of NVIDIA's diffusion demo.

What comes out, per quantized op:
  activation -> QuantizeLinear -> DequantizeLinear -> op <- DequantizeLinear <- 8-bit weight initializer
* weights: per output channel (Conv axis 0, MatMul [in, out] axis 1, Gemm transB axis 0), stored already
  quantized, so the 8-bit file is about 4x smaller than the FP32 one;
* activations: per tensor, from the calibration file (trtkit/calibfile.py) or, without one, the max
  over one onnxruntime run on the profile's sample inputs; one Q/DQ per tensor, shared by all the
  quantized ops that read it (q/k/v projections of one normalized input);
* attention (FP8 at level 4, or when asked): Q/DQ on the inputs of both batched matmuls (Q, K, V and
  the softmax output, the latter with the fixed amax 1), the pattern TensorRT fuses into FP8 MHA;
* SmoothQuant vectors from the calibration: a per-channel 1/s folded into the preceding LayerNorm (or
  a Mul when there is none) and s multiplied into the weight's input channels;
* then (fp16=True) everything else strongly typed FP16 (trtkit/graph/fp16.py), with FP32 islands and
  casts where TensorRT needs them.

The pass in modules: what to quantize (choice.py), the scale arithmetic (scales.py), where the
activation ranges come from (ranges.py), the graph rewriting (rewrite.py), files (onnx_io.py). This
module runs them in order and keeps the public names other code imports from `trtkit.graph.qdq`.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_graphsurgeon as gs

from trtkit._files import ONNX_PROTO_LIMIT, check_output
from trtkit.errors import TrtkitError
from trtkit.graph import patterns, patterns_controlnet, patterns_dit
from trtkit.graph.choice import (
    DEFAULT_EXCLUDE,
    LEVELS,
    PRECISIONS,
    QKV_LEAVES,
    UNET_RULES,
    Decision,
    QuantizeConfig,
    Rules,
    decide,
    matches_pattern,
    resolve_level,
)
from trtkit.graph.onnx_io import (
    Spill,
    external_bytes,
    load_onnx,
    materialize_external,
    opset,
    set_meta,
    write_model,
)
from trtkit.graph.ranges import activation_ranges, max_calibrate, sample_feeds
from trtkit.graph.rewrite import attention_core, insert_qdq
from trtkit.graph.scales import (
    FP16_MIN_NORMAL,
    ONNX_QTYPE,
    QMAX,
    act_scale,
    dequantize_weight,
    quantize_weight,
)

__all__ = ["DEFAULT_EXCLUDE", "FP16_MIN_NORMAL", "LEVELS", "META_KEY", "ONNX_QTYPE", "PRECISIONS", "QKV_LEAVES",
           "QMAX", "Decision", "QuantizeConfig", "QuantizeResult", "act_scale", "decide", "dequantize_weight",
           "matches_pattern", "max_calibrate", "quantize", "quantize_weight", "resolve_level", "write_model"]

log = logging.getLogger(__name__)

META_KEY = "trtkit.qdq"  # JSON: precision, level, decisions (coverage reads it)
# the former private names, still imported by tests and helpers
_sample_feeds = sample_feeds
_set_meta = set_meta


@dataclass
class QuantizeResult:
    path: Path
    precision: str
    level: float
    counts: dict[str, dict[str, int]]  # kind -> {"quantized": n, "total": n}
    decisions: list[Decision]
    calibration: str  # where the activation ranges came from
    seconds: float
    qdq_pairs: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{c['quantized']}/{c['total']} {k}" for k, c in self.counts.items()]
        return f"{self.precision.upper()} level {self.level:g}: " + ", ".join(parts) + " quantized"

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "precision": self.precision, "level": self.level, "counts": self.counts,
                "calibration": self.calibration, "seconds": round(self.seconds, 3), "qdq_pairs": self.qdq_pairs,
                "notes": self.notes,
                "decisions": [{"module": d.module, "kind": d.kind, "quantized": d.quantized, "type": d.type,
                               "reason": d.reason, "amax": d.amax, "amax_source": d.amax_source}
                              for d in self.decisions]}



def quantize(cfg: QuantizeConfig) -> QuantizeResult:
    """Insert Q/DQ into `cfg.onnx_path` and write `cfg.output` (and its .data file when > 2 GB)."""
    with patterns.quiet_gs():
        return _quantize(cfg)


def _quantize(cfg: QuantizeConfig) -> QuantizeResult:
    t0 = time.perf_counter()
    if cfg.precision not in PRECISIONS:
        raise TrtkitError(f"precision {cfg.precision!r} is not one of {', '.join(PRECISIONS)}")
    level = resolve_level(cfg.precision, cfg.level)
    src = Path(cfg.onnx_path)
    calib = [Path(cfg.calib), Path(cfg.calib).with_suffix(".safetensors")] if cfg.calib is not None else []
    dest = check_output(cfg.output, default_name=f"{src.stem}.{cfg.precision}.onnx", what="output ONNX",
                        inputs=[src, src.parent / (src.name + ".data"), *calib],
                        sidecars=lambda o: [o.parent / (o.name + ".data")])
    if cfg.io_dtype not in ("float32", "float16"):
        raise TrtkitError(f"io_dtype {cfg.io_dtype!r} is not float32 or float16")
    cal = None
    if cfg.calib is not None:
        from trtkit.calibfile import check_model
        from trtkit.calibfile import load as load_calib

        cal = load_calib(cfg.calib)
    model = load_onnx(src, external=False, needs_data=True)  # weights are read one by one when quantized
    ops = opset(model)
    if ops < 13:
        raise TrtkitError(f"{src.name} has opset {ops}; per-channel Q/DQ needs opset >= 13 (re-export with 19)")
    if cfg.precision == "fp8" and ops < 19:
        raise TrtkitError(f"{src.name} has opset {ops}; FP8 Q/DQ needs opset >= 19 (re-export with 19)")
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise TrtkitError(f"{src.name} already contains QuantizeLinear/DequantizeLinear nodes; "
                          "quantize the unquantized export")
    meta = {p.key: p.value for p in model.metadata_props}
    graph = gs.import_onnx(model)
    matches = patterns.find(graph, patterns.scope_of(meta))
    rules = UNET_RULES
    if patterns_dit.is_dit(meta):  # FLUX / SD3 transformer: its own levels and exclusions
        matches = patterns_dit.refine(matches, meta)
        rules = Rules(patterns_dit.exclusion, patterns_dit.level_admits)
    elif patterns_controlnet.is_controlnet(meta):  # its zero convs and conditioning embedding stay high precision
        rules = patterns_controlnet.RULES
    if matches.empty:
        raise TrtkitError(f"nothing matched in {src.name}: no linear (MatMul/Gemm with a constant weight), "
                          "conv or attention (MatMul-Softmax-MatMul) pattern; nothing to quantize")
    known = matches.modules()
    if cal is not None:
        cal.check_modules(known, where=src.name)
        check_model(cal, meta.get("trtkit.source"), src.name)
    decisions = decide(matches, cfg, level, rules)

    nodes = {n.name: n for n in graph.nodes}
    w_q = [m for m in (*matches.conv, *matches.linear) if decisions[m.module].quantized]
    a_q = [a for a in matches.attention if decisions[a.module].quantized]
    # amax per (module or attention role): calibration first, the sample run for the rest.
    amax, source, calibration = activation_ranges(model, w_q, a_q, nodes, cal, cfg.profile, cfg.seed, src.parent)
    external = external_bytes(model) > ONNX_PROTO_LIMIT
    del model

    # A source with more than 2 GB of external data: its 8-bit weights go straight to the output's data file,
    # so the pass never holds them (peak: the structure, the unquantized rest, one weight being quantized).
    spill = Spill(dest) if external else None
    try:
        return _rewrite(cfg, t0, dest, level, graph, matches, decisions, w_q, a_q, amax, source, calibration,
                        nodes, cal, meta, src, spill)
    finally:
        if spill is not None:
            spill.cleanup()


def _rewrite(cfg: QuantizeConfig, t0: float, dest: Path, level: float, graph: gs.Graph, matches: Any,
             decisions: dict[str, Decision], w_q: list[Any], a_q: list[Any], amax: dict[str, float],
             source: dict[str, str], calibration: str, nodes: dict[str, Any], cal: Any, meta: dict[str, str],
             src: Path, spill: Spill | None) -> QuantizeResult:
    pairs = insert_qdq(graph, w_q, a_q, amax, source, decisions, cal, cfg.precision, cfg.fp16, src.parent, spill)
    graph.cleanup()
    materialize_external(graph, src.parent, spill)
    notes = list(matches.notes)
    if cal is not None and cal.precision and cal.precision != cfg.precision:
        notes.append(f"the calibration file was made for {cal.precision}; its ranges are used for {cfg.precision}")
    if cfg.fp16:
        from trtkit.graph.fp16 import to_fp16

        keep = set()
        for a in a_q:  # TensorRT has FP32-accumulation kernels only for 8-bit MHA: keep its core FP32
            keep |= attention_core(nodes, a)
        stats = to_fp16(graph, keep_fp32_nodes=keep, io_dtype=cfg.io_dtype)
        notes.append(f"FP16 elsewhere ({stats.summary()})")
    graph.cleanup().toposort()

    ordered = [decisions[mod] for mod in [*(x.module for x in matches.linear), *(x.module for x in matches.conv),
                                          *(x.module for x in matches.attention)]]
    counts: dict[str, dict[str, int]] = {}
    for kind in ("linear", "conv", "attention"):
        ds = [d for d in ordered if d.kind == kind]
        counts[kind] = {"quantized": sum(d.quantized for d in ds), "total": len(ds)}
    meta[META_KEY] = json.dumps({"precision": cfg.precision, "level": level, "calibration": calibration,
                                 "fp16": cfg.fp16,
                                 "decisions": {d.module: [d.kind, d.quantized, d.type, d.reason] for d in ordered}})
    out_model = gs.export_onnx(graph)
    # the export copied every initializer: drop the graph's own copies before writing
    nodes.clear()
    del graph
    gc.collect()
    out_model.ir_version = max(out_model.ir_version, 9)
    set_meta(out_model, meta)
    holder = [out_model]
    del out_model
    if spill is not None:
        spill.close()
    write_model(holder, dest, spill=spill)
    result = QuantizeResult(path=dest, precision=cfg.precision, level=level, counts=counts, decisions=ordered,
                            calibration=calibration, seconds=time.perf_counter() - t0, qdq_pairs=pairs,
                            notes=notes)
    skipped_attn = [d for d in ordered if d.kind == "attention" and not d.quantized and "head size" in d.reason]
    if skipped_attn:
        result.notes.append(f"{len(skipped_attn)} attention block(s) left out: {skipped_attn[0].reason}")
    return result
