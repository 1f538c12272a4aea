"""The calibration file: the contract between `trtkit calibrate` (torch side) and the Q/DQ pass.

Format (JSON, `format: trtkit-calib`, `version: 1`), keyed by diffusers module names:

    {
      "format": "trtkit-calib", "version": 1,
      "precision": "int8" | "fp8",
      "model": {"source": "...", "class": "UNet2DConditionModel", "config_hash": "..."},
      "run": {"prompts": [...], "num_prompts": 32, "steps": 30, "batch": 2, "scheduler": "..."},
      "settings": {"method": "percentile", "percentile": 1.0, "reduction": "min-mean", "level": 3.0, ...},
      "activations": {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": {"amax": 3.2},
        "down_blocks.1.resnets.0.conv1": {"amax": 5.1},
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.q_bmm": {"amax": 4.0},
        ...                                   # attention inputs: <attn module>.q_bmm / k_bmm / v_bmm / softmax
      },
      "smoothquant": {                        # optional, INT8 linear layers
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": {"alpha": 0.8, "key": "<name>.smooth"}
      },
      "arrays": "calib.safetensors"           # per-channel vectors (float32), beside the JSON
    }

An activation `amax` is the absolute range of that module's *input* (after any SmoothQuant division),
so the scale is amax/127 for INT8 and amax/448 for FP8. A SmoothQuant `smooth` vector `s` (length =
input channels) means: activations are divided by `s`, the weight's input channels multiplied by `s`.

Only json, numpy and safetensors are used here, so the graph passes can read it without torch.

`load` refuses a file without `precision`, `model`, `settings` or activation ranges (a file that carries
no calibration is an error, not a silent max calibration). `model.config_hash` is a hash of the UNet's
config.json; `check_model` compares it with the model the file is used with (the folder an ONNX was
exported from): a mismatch is an error. For a DiT (FLUX.1, SD3.x) the file's `model.component` is
`transformer` and the hash is of transformer/config.json. To use a file on another model anyway, delete `config_hash`
from its `model` entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtkit._files import write_text_atomic
from trtkit.errors import TrtkitError

FORMAT = "trtkit-calib"
VERSION = 1
ATTENTION_INPUTS = ("q_bmm", "k_bmm", "v_bmm", "softmax")


@dataclass
class Calibration:
    precision: str = "int8"
    activations: dict[str, float] = field(default_factory=dict)  # module name -> input amax
    smooth: dict[str, Any] = field(default_factory=dict)  # module name -> np.ndarray (float32)
    alphas: dict[str, float] = field(default_factory=dict)  # module name -> SmoothQuant alpha
    model: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def amax(self, module: str) -> float | None:
        return self.activations.get(module)

    def check_modules(self, known: Iterable[str], where: str = "the model") -> None:
        """Every calibrated name must exist in the model: a file for another model is an error."""
        known_set = set(known)
        names = set(self.activations) | set(self.smooth)
        base = {n.rsplit(".", 1)[0] if n.rsplit(".", 1)[-1] in ATTENTION_INPUTS else n for n in names}
        missing = sorted(n for n in base if n not in known_set)
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise TrtkitError(f"calibration names module {missing[0]!r}{more}, which {where} does not have; "
                              "was it calibrated for another model?")


def unet_config_hash(config: dict[str, Any]) -> str:
    """The `model.config_hash` of a calibration: the UNet config.json without its `_` keys, canonical."""
    canon = json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def check_model(cal: Calibration, model_dir: Path | str | None, where: str) -> None:
    """The file's `model.config_hash` against the calibrated component of `model_dir` (`model.component`:
    "unet", "transformer" for a DiT, or a ControlNet's folder name; skipped where either is unknown)."""
    want = cal.model.get("config_hash") if isinstance(cal.model, dict) else None
    component = cal.model.get("component") if isinstance(cal.model, dict) else None  # a folder name read from a file
    # only folder names we know (the UNet, a DiT's transformer, controlnet / controlnet_<n>): it names a path
    known = component in ("unet", "transformer") or (
        isinstance(component, str) and re.fullmatch(r"controlnet(_\d+)?", component) is not None)
    component = component if known else "unet"
    cfg_path = Path(model_dir) / component / "config.json" if model_dir else None
    if not want or cfg_path is None or not cfg_path.is_file():
        return
    try:
        got = unet_config_hash(json.loads(cfg_path.read_text()))
    except (OSError, ValueError):
        return
    if got != want:
        made_for = cal.model.get("source") or "another model"
        what = "UNet" if component == "unet" else component
        raise TrtkitError(f"the calibration file was made for another {what} ({made_for}, config hash {want}) than "
                          f"{where} (from {model_dir}, config hash {got}); calibrate this model with trtkit "
                          "calibrate, or delete \"config_hash\" from the file's \"model\" entry to use it anyway")


def save(cal: Calibration, path: Path | str) -> Path:
    path = Path(path)
    arrays_name = path.with_suffix(".safetensors").name
    doc: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "precision": cal.precision,
        "model": cal.model, "run": cal.run, "settings": cal.settings,
        "activations": {k: {"amax": float(v)} for k, v in sorted(cal.activations.items())},
    }
    if cal.smooth:
        import numpy as np
        from safetensors.numpy import save_file

        from trtkit._files import atomic_path

        doc["smoothquant"] = {k: {"alpha": cal.alphas.get(k), "key": f"{k}.smooth"} for k in sorted(cal.smooth)}
        doc["arrays"] = arrays_name
        with atomic_path(path.parent / arrays_name) as tmp:
            save_file({f"{k}.smooth": np.ascontiguousarray(v, dtype=np.float32) for k, v in cal.smooth.items()},
                      str(tmp))
    write_text_atomic(path, json.dumps(doc, indent=1) + "\n")
    return path


def load(path: Path | str) -> Calibration:
    from trtkit._files import check_input

    path = check_input(path, "calibration file")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrtkitError(f"{path} is not a trtkit calibration file (not JSON: {e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TrtkitError(f"{path} is not a trtkit calibration file (no \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise TrtkitError(f"{path} has calibration format version {doc.get('version')}; this trtkit reads "
                          f"version {VERSION}")
    missing = [k for k in ("precision", "model", "settings", "activations") if k not in doc]
    if missing:
        raise TrtkitError(f"{path} is not a complete trtkit calibration file: it has no \"{missing[0]}\" entry "
                          "(write it with trtkit calibrate)")
    if doc["precision"] not in ("int8", "fp8"):
        raise TrtkitError(f"{path}: precision {doc['precision']!r} is not int8 or fp8")
    if not isinstance(doc["activations"], dict) or not doc["activations"]:
        raise TrtkitError(f"{path} has no activation ranges: it carries no calibration (write it with trtkit "
                          "calibrate, or leave --calib out for max calibration on a sample run)")
    if not isinstance(doc["model"], dict) or not isinstance(doc["settings"], dict):
        raise TrtkitError(f"{path}: \"model\" and \"settings\" must be JSON objects")
    acts: dict[str, float] = {}
    for k, v in doc["activations"].items():
        amax = v.get("amax") if isinstance(v, dict) else None
        if not isinstance(amax, (int, float)) or not math.isfinite(amax) or amax <= 0:
            raise TrtkitError(f"{path}: activation {k!r} has no positive finite amax")
        acts[k] = float(amax)
    cal = Calibration(precision=doc["precision"], activations=acts, model=doc["model"],
                      run=doc.get("run") or {}, settings=doc["settings"])
    sq = doc.get("smoothquant") or {}
    if sq:
        from safetensors.numpy import load_file

        arrays_path = path.parent / doc.get("arrays", "")
        if not arrays_path.is_file():
            raise TrtkitError(f"{path}: SmoothQuant arrays file {arrays_path.name} is missing beside it")
        arrays = load_file(str(arrays_path))
        for k, v in sq.items():
            if v.get("key") not in arrays:
                raise TrtkitError(f"{path}: SmoothQuant vector for {k!r} is missing from {arrays_path.name}")
            cal.smooth[k] = arrays[v["key"]]
            if v.get("alpha") is not None:
                cal.alphas[k] = float(v["alpha"])
    return cal
