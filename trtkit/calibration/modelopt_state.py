"""ModelOpt quantizer state <-> trtkit calibration file.

ModelOpt keeps a quantized module's ranges as buffers of its quantizers, in the model's state dict:
`<module>.input_quantizer._amax` (the activation range, a scalar for per-tensor),
`<module>.weight_quantizer._amax` (per output channel for INT8, a scalar for FP8), and on a diffusers
`Attention` `<attn>.{q,k,v}_bmm_quantizer._amax` and `<attn>.softmax_quantizer._amax`.
`mto.modelopt_state(model)` holds only the quantizers' properties (`_num_bits`, `_axis`,
`_disabled`, ...), not the ranges, so what this module reads is what a user has on disk:

* `mto.save(model, f)`: `{"modelopt_state": ..., "model_state_dict": ...}` (ranges + properties);
* `torch.save(model.state_dict(), f)` or a `.safetensors` of it (ranges only);
* `get_quantizer_state_dict(model)`: `{"<module>.input_quantizer": {"_amax": t}, ...}` (ranges only).

Mapping (module names are the diffusers names, the keys of trtkit.calibfile):

| ModelOpt quantizer                    | trtkit calibration key  |
|---------------------------------------|-------------------------|
| `<module>.input_quantizer`            | `<module>`              |
| `<attn>.q_bmm_quantizer` / k / v      | `<attn>.q_bmm` / k / v  |
| `<attn>.softmax_quantizer`            | `<attn>.softmax`        |

Weight ranges are not carried over: the Q/DQ pass takes weight scales from the weights themselves.
Input quantizers of modules without a weight quantizer (ModelOpt's `*input_quantizer` pattern also
catches LayerNorm inputs) are left out: trtkit quantizes the inputs of weighted ops only.
Where the properties are known, disabled quantizers are left out (their buffers survive a disable).
The precision is `_num_bits` (8 -> int8, (4, 3) -> fp8). A per-channel activation range (axis set) has
no per-tensor equivalent and is an error rather than a silent max.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtkit import calibfile
from trtkit.errors import TrtkitError

_ATTN = {"q_bmm_quantizer": "q_bmm", "k_bmm_quantizer": "k_bmm", "v_bmm_quantizer": "v_bmm",
         "softmax_quantizer": "softmax"}
_INPUT = "input_quantizer"


@dataclass
class QuantizerState:
    """What trtkit reads of one ModelOpt quantizer."""

    amax: Any = None  # numpy array (0-d for per-tensor), or None when never calibrated
    num_bits: Any = None  # 8, (4, 3), ... where the properties are known
    axis: Any = None
    enabled: bool = True


@dataclass
class ModeloptState:
    quantizers: dict[str, QuantizerState] = field(default_factory=dict)  # "<module>.<quantizer>"
    has_properties: bool = False
    version: str | None = None


def _np(t: Any) -> Any:
    import numpy as np

    if hasattr(t, "detach"):
        return t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def parse(doc: Any) -> ModeloptState:
    """A loaded ModelOpt checkpoint (any of the three forms above) -> its quantizers."""
    if not isinstance(doc, dict):
        raise TrtkitError("not a ModelOpt state: expected a dict (mto.save checkpoint or a state dict)")
    st = ModeloptState()
    ranges: dict[str, Any]
    if "model_state_dict" in doc or "modelopt_state" in doc:
        ranges = dict(doc.get("model_state_dict") or {})
        mo = doc.get("modelopt_state") or {}
        st.version = mo.get("modelopt_version")
        for mode in mo.get("modelopt_state_dict") or []:
            meta = (mode[1] if isinstance(mode, (tuple, list)) and len(mode) > 1 else {}).get("metadata", {})
            for name, props in (meta.get("quantizer_state") or {}).items():
                if not isinstance(props, dict) or props.get("is_sequential_quantizer"):
                    continue
                q = st.quantizers.setdefault(name, QuantizerState())
                q.num_bits = props.get("_num_bits", q.num_bits)
                q.axis = props.get("_axis", q.axis)
                q.enabled = not props.get("_disabled", False)
                st.has_properties = True
    else:
        ranges = doc
    for key, value in ranges.items():
        if isinstance(value, dict):  # get_quantizer_state_dict(): {"<module>.<quantizer>": {"_amax": t}}
            q = st.quantizers.setdefault(key, QuantizerState())
            if "_amax" in value:
                q.amax = _np(value["_amax"])
        elif isinstance(key, str) and key.endswith("._amax"):
            st.quantizers.setdefault(key[: -len("._amax")], QuantizerState()).amax = _np(value)
    if not any(q.amax is not None for q in st.quantizers.values()):
        raise TrtkitError("no quantizer ranges (`*_quantizer._amax`) in this file: save the model's state dict "
                          "after calibration (mto.save(model, path)), not mto.modelopt_state() alone")
    return st


def load(path: Path | str) -> ModeloptState:
    """Read a ModelOpt checkpoint from disk (torch file, tensors only, or a .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise TrtkitError(f"ModelOpt state {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return parse(load_file(str(path)))
    import pickle

    import torch

    try:
        # weights_only: tensors and plain containers only (mto.save files load this way); no code runs
        doc = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise TrtkitError(f"{path} is not a torch checkpoint with tensors only: {str(e).splitlines()[0]}") from e
    return parse(doc)


def _precision(bits: Any) -> str | None:
    if bits == 8:
        return "int8"
    if isinstance(bits, (tuple, list)) and tuple(bits) == (4, 3):
        return "fp8"
    return None


def to_calibration(st: ModeloptState, precision: str | None = None, source: str = "") -> calibfile.Calibration:
    """The trtkit calibration equivalent to ModelOpt's activation ranges."""
    acts: dict[str, float] = {}
    kinds: set[str] = set()
    skipped = not_weighted = 0
    # ModelOpt's `*input_quantizer` also matches LayerNorm (QuantLayerNorm) inputs; trtkit quantizes the
    # inputs of weighted ops only, which are the modules that have a weight_quantizer too.
    weighted = {n.rpartition(".")[0] for n in st.quantizers if n.endswith(".weight_quantizer")}
    for name, q in sorted(st.quantizers.items()):
        module, _, qname = name.rpartition(".")
        if qname == _INPUT:
            if weighted and module not in weighted:
                not_weighted += q.enabled and q.amax is not None
                continue
            key = module
        elif qname in _ATTN:
            key = f"{module}.{_ATTN[qname]}"
        else:
            continue
        if not q.enabled or q.amax is None:
            skipped += not q.enabled
            continue
        if q.amax.size != 1:
            raise TrtkitError(f"{name} has a per-channel range ({q.amax.size} values, axis {q.axis}); trtkit's "
                              "activation ranges are per tensor")
        amax = float(q.amax.reshape(-1)[0])
        if not amax > 0 or amax != amax or amax == float("inf"):
            raise TrtkitError(f"{name} has no positive finite amax ({amax})")
        acts[key] = amax
        p = _precision(q.num_bits)
        if p:
            kinds.add(p)
    if not acts:
        raise TrtkitError("no enabled activation quantizer (`*.input_quantizer`, `*_bmm_quantizer`, "
                          "`*.softmax_quantizer`) has a range in this state")
    if len(kinds) > 1:
        raise TrtkitError(f"the state mixes {' and '.join(sorted(kinds))} activation quantizers; trtkit's file "
                          "has one precision")
    found = next(iter(kinds), None)
    if precision and found and precision != found:
        raise TrtkitError(f"the state's activation quantizers are {found}, not {precision}")
    prec = precision or found or "int8"
    settings = {"method": "modelopt", "modelopt_version": st.version, "disabled_quantizers_left_out": skipped,
                "unweighted_inputs_left_out": not_weighted, "properties_known": st.has_properties}
    return calibfile.Calibration(precision=prec, activations=acts, model={"source": source},
                                 run={}, settings=settings)


def from_calibration(cal: calibfile.Calibration) -> dict[str, dict[str, Any]]:
    """A trtkit calibration as ModelOpt's quantizer state dict, `{"<module>.<quantizer>": {"_amax": t}}`:
    load it with `modelopt.torch.quantization.utils.set_quantizer_state_dict(model, sd)` after
    `mtq.quantize(model, config)` (no forward loop needed). SmoothQuant vectors have no ModelOpt
    counterpart here and are an error."""
    import torch

    if cal.smooth:
        raise TrtkitError("this calibration has SmoothQuant vectors; ModelOpt's quantizer state has no place "
                          "for trtkit's per-layer smoothing (convert a file calibrated without --smoothquant)")
    back = {v: k for k, v in _ATTN.items()}
    out: dict[str, dict[str, Any]] = {}
    for key, amax in sorted(cal.activations.items()):
        module, _, last = key.rpartition(".")
        quantizer = f"{module}.{back[last]}" if module and last in back else f"{key}.{_INPUT}"
        out[quantizer] = {"_amax": torch.tensor(float(amax), dtype=torch.float32)}
    return out


def _check_model(cal: calibfile.Calibration, model_dir: Path | str | None) -> None:
    if model_dir is not None:
        from trtkit.calibration.calibrate import unet_module_names

        cal.check_modules(unet_module_names(Path(model_dir)), where=f"the UNet of {model_dir}")


def convert_to_calib(state_path: Path | str, out: Path | str, precision: str | None = None,
                     model_dir: Path | str | None = None) -> Path:
    """`trtkit calibrate --from-modelopt STATE [MODEL_DIR] -o calib.json`."""
    cal = to_calibration(load(state_path), precision, source=str(model_dir or state_path))
    _check_model(cal, model_dir)
    return calibfile.save(cal, out)


def convert_to_modelopt(calib_path: Path | str, out: Path | str, model_dir: Path | str | None = None) -> Path:
    """`trtkit calibrate --to-modelopt CALIB [MODEL_DIR] -o amax.pt`: a torch file of the quantizer state dict."""
    import io

    import torch

    from trtkit._files import write_bytes_atomic

    cal = calibfile.load(calib_path)
    _check_model(cal, model_dir)
    sd = from_calibration(cal)
    buf = io.BytesIO()
    torch.save(sd, buf)
    return write_bytes_atomic(out, buf.getvalue())
