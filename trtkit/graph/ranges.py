"""Activation ranges for the Q/DQ pass: from the calibration file where it has them, else the max over
one onnxruntime run on the profile's sample inputs (seeded, shaped from the graph's own inputs)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from trtkit.errors import TrtkitError
from trtkit.graph.onnx_io import has_external
from trtkit.graph.patterns import AttentionMatch, WeightedMatch
from trtkit.graph.scales import prescale_factor

log = logging.getLogger(__name__)


def activation_ranges(model: onnx.ModelProto, w_q: Sequence[WeightedMatch], a_q: Sequence[AttentionMatch],
                      nodes: dict[str, gs.Node], cal: Any, profile: str, seed: int,
                      base_dir: Path) -> tuple[dict[str, float], dict[str, str], str]:
    """amax per module (and per attention role `<module>.q_bmm` ...), where each came from, and a line
    saying where the ranges came from overall. `cal` is a loaded calibration file or None."""
    amax: dict[str, float] = {}
    source: dict[str, str] = {}
    need_run: dict[str, str] = {}  # key -> tensor
    for m in w_q:
        got = cal.amax(m.module) if cal is not None else None
        if got is not None:
            amax[m.module], source[m.module] = got, "calibration"
        else:
            need_run[m.module] = m.input
    for a in a_q:
        for role, t in (("q_bmm", a.q), ("k_bmm", a.k), ("v_bmm", a.v)):
            key = f"{a.module}.{role}"
            got = cal.amax(key) if cal is not None else None
            if got is not None:
                amax[key], source[key] = got * prescale_factor(nodes, a, role), "calibration"
            else:
                need_run[key] = t
        amax[f"{a.module}.softmax"], source[f"{a.module}.softmax"] = 1.0, "fixed"  # probabilities are <= 1
    calibration = "calibration file" if cal is not None else "max over a sample run"
    if need_run:
        smoothed = [k for k in need_run if cal is not None and k in cal.smooth]
        if smoothed:
            raise TrtkitError(f"calibration has a SmoothQuant vector but no amax for {smoothed[0]}")
        run = max_calibrate(model, sorted(set(need_run.values())), profile, seed, base_dir=base_dir)
        for k, t in need_run.items():
            amax[k], source[k] = run[t], "sample run"
        if cal is not None:
            calibration = f"calibration file ({len(need_run)} ranges from a sample run)"
            # Loud: these ranges come from random sample inputs, not the prompts the file was made with.
            log.warning("the calibration file has no range for %d of the %d inputs quantized here (e.g. %s): "
                        "they come from a max calibration on sample inputs, not from your prompts; calibrate "
                        "at this level (trtkit calibrate --level) for real ranges", len(need_run),
                        len(need_run) + sum(v == "calibration" for v in source.values()), sorted(need_run)[0])
    return amax, source, calibration


def sample_feeds(model: onnx.ModelProto, profile: str, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs of the profile's opt shapes, sized from the graph's own input dims."""
    from trtkit.exporter import example_inputs
    from trtkit.profiles import ModelDims, get_profile

    ins = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
           for i in model.graph.input}
    inits = {i.name for i in model.graph.initializer}
    ins = {k: v for k, v in ins.items() if k not in inits}
    component = next((p.value for p in model.metadata_props if p.key == "trtkit.component"), None)
    dit = next((p.value for p in model.metadata_props if p.key == "trtkit.dit_dims"), None)
    if dit is not None:  # a FLUX / SD3 transformer: its shapes and input conventions from its export
        comp = "transformer" if component in (None, "transformer") else "text_encoder_3"  # or a T5
        return _dit_feeds(model, dit, comp, profile, seed, ins)
    if component is None:
        component = "unet" if "sample" in ins else "vae_decoder" if "latent" in ins else (
            "text_encoder" if "input_ids" in ins else None)
    shapes = None
    if component is not None:
        kw: dict[str, Any] = {}
        if "sample" in ins and ins["sample"][1]:
            kw["latent_channels"] = ins["sample"][1]
        if "latent" in ins and ins["latent"][1]:
            kw["latent_channels"] = ins["latent"][1]
        if "encoder_hidden_states" in ins and ins["encoder_hidden_states"][-1]:
            kw["cross_attention_dim"] = ins["encoder_hidden_states"][-1]
        if "text_embeds" in ins and ins["text_embeds"][-1]:
            kw["text_embeds_dim"] = ins["text_embeds"][-1]
        if "time_ids" in ins and ins["time_ids"][-1]:
            kw["time_ids_len"] = ins["time_ids"][-1]
        downs = {n.name.split("/down_blocks.")[1].split("/")[0] for n in model.graph.node
                 if "/down_blocks." in n.name}
        if downs:
            kw["down_levels"] = len(downs)
        try:
            shapes = _shapes(get_profile(profile), component, ModelDims(**kw), model)
        except TrtkitError:
            shapes = None
        if shapes is not None and set(shapes) != set(ins):
            shapes = None
    if shapes is None:  # not a trtkit-shaped graph: static dims, 1 for the symbolic ones
        from trtkit.profiles import ShapeRange

        shapes = {k: ShapeRange.fixed(tuple(d or 1 for d in v)) for k, v in ins.items()}
    feeds = example_inputs(shapes, "opt", seed)
    want = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    for k, v in list(feeds.items()):  # match the graph's input types (int32/int64 ids, fp16 I/O)
        np_t = onnx.helper.tensor_dtype_to_np_dtype(want[k]) if k in want else v.dtype
        feeds[k] = v.astype(np_t)
    return feeds


def _shapes(prof: Any, component: str, dims: Any, model: onnx.ModelProto) -> Any:
    """The profile's shapes; a ControlNet or a residual-input UNet adds its residual layout (from its export)."""
    from trtkit.profiles_controlnet import META_CONTROLNET, ControlNetSpec
    from trtkit.profiles_controlnet import shapes as cn_shapes

    spec = next((p.value for p in model.metadata_props if p.key == META_CONTROLNET), None)
    if spec is None:
        return prof.shapes(component, dims)
    return cn_shapes(prof, component, dims, ControlNetSpec.from_json(spec))


def _dit_feeds(model: onnx.ModelProto, dims_json: str, component: str, profile: str, seed: int,
               ins: dict[str, list[int | None]]) -> dict[str, np.ndarray]:
    from trtkit.exporter import example_inputs
    from trtkit.profiles import get_profile
    from trtkit.profiles_dit import DitDims, sample_values
    from trtkit.profiles_dit import shapes as dit_shapes

    dims, prof = DitDims.from_json(dims_json), get_profile(profile)
    if prof.family is not None and prof.family != dims.family:  # e.g. the default tiny-256 stays usable
        raise TrtkitError(f"profile {profile} is for {prof.family.upper()} models; this graph is a "
                          f"{dims.family.upper()} transformer")
    shapes = dit_shapes(prof, component, dims)
    if set(shapes) != set(ins):
        raise TrtkitError(f"the graph's inputs ({', '.join(ins)}) are not the {dims.family.upper()} transformer's "
                          f"({', '.join(shapes)}); pass --calib")
    feeds = example_inputs(shapes, "opt", seed, fill=sample_values(prof, dims))
    want = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    return {k: v.astype(onnx.helper.tensor_dtype_to_np_dtype(want[k])) for k, v in feeds.items()}


@contextmanager
def _big_allocs_unmapped_on_free() -> Iterator[None]:
    """glibc only: serve allocations >= 1 MiB with mmap and give them back on free, while the sample run
    allocates and frees its activations (glibc's dynamic threshold otherwise keeps freed 10-100 MB tensors
    in a fragmented heap: 1.3 GiB more peak on an SD 1.5 UNet). Placement only; the numbers are the same."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        yield
        return
    m_trim, m_mmap = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (malloc.h)
    mallopt(m_mmap, 1 << 20)
    mallopt(m_trim, 1 << 20)
    try:
        yield
    finally:  # glibc's defaults (128 KiB) for the rest of the pass
        mallopt(m_mmap, 128 << 10)
        mallopt(m_trim, 128 << 10)


def max_calibrate(model: onnx.ModelProto, tensors: list[str], profile: str, seed: int = 0,
                  base_dir: Path | None = None) -> dict[str, float]:
    """amax of each tensor over one onnxruntime run on sample inputs.

    Memory: on a copy of the model each tensor gets Cast(float) -> Abs -> ReduceMax and only those
    scalars are graph outputs, so a tensor is freed as soon as its readers ran instead of all of them
    being held to the end of the run (max and abs are exact: the same numbers as numpy on the full
    tensor); the CPU arena is off so onnxruntime's peak is the live tensors, not a high-water pool."""
    if not tensors:
        return {}
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise TrtkitError("without a calibration file the pass measures ranges with onnxruntime, which is not "
                          "installed; pip install onnxruntime or pass --calib") from e
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = {n.name for n in m.graph.node}
    taken = {*names, *(t for n in m.graph.node for t in (*n.input, *n.output)),
             *(i.name for i in m.graph.input), *(i.name for i in m.graph.initializer)}

    def _fresh(base: str) -> str:
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    del m.graph.output[:]  # the model's own outputs are not needed: only the amax scalars come back
    outs: list[str] = []
    for i, t in enumerate(tensors):
        f, a, r = _fresh(f"trtkit_amax_{i}/f32"), _fresh(f"trtkit_amax_{i}/abs"), _fresh(f"trtkit_amax_{i}")
        m.graph.node.extend([
            onnx.helper.make_node("Cast", [t], [f], _fresh(f"trtkit_amax_{i}/Cast"), to=onnx.TensorProto.FLOAT),
            onnx.helper.make_node("Abs", [f], [a], _fresh(f"trtkit_amax_{i}/Abs")),
            onnx.helper.make_node("ReduceMax", [a], [r], _fresh(f"trtkit_amax_{i}/ReduceMax"), keepdims=0),
        ])
        m.graph.output.append(onnx.helper.make_tensor_value_info(r, onnx.TensorProto.FLOAT, []))
        outs.append(r)
    feeds = sample_feeds(model, profile, seed)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor visible
    opts.enable_cpu_mem_arena = False  # the arena keeps and fragments the 1 GiB attention-score buffers
    opts.enable_mem_pattern = False  # one run: a recorded pattern would never be reused
    try:
        if has_external(m):  # weights stay in their .data file: run from a file beside it
            import tempfile

            with tempfile.NamedTemporaryFile(suffix=".onnx", prefix=".trtkit-calib-", dir=base_dir) as tmp:
                tmp.write(m.SerializeToString())
                tmp.flush()
                del m
                sess = ort.InferenceSession(tmp.name, opts, providers=["CPUExecutionProvider"])
        else:
            data = m.SerializeToString()
            del m
            sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
            del data
        with _big_allocs_unmapped_on_free():
            got = sess.run(outs, feeds)
            del sess
    except Exception as e:  # onnxruntime raises its own types
        raise TrtkitError(f"max calibration run failed in onnxruntime: {str(e).splitlines()[0]}") from e
    # an empty tensor reduces to -inf: its amax is 0, as before
    return {t: 0.0 if float(o) == float("-inf") else float(o) for t, o in zip(tensors, got, strict=True)}

