"""What the Q/DQ pass quantizes: the configuration, the quantization levels of NVIDIA's diffusion demo,
the default exclusions, and per module the decision with its reason (explicit exclude beats include
beats the defaults and the level)."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from trtkit.errors import TrtkitError
from trtkit.graph.patterns import Matches, WeightedMatch

PRECISIONS = ("int8", "fp8")
LEVELS = (1.0, 2.0, 2.5, 3.0, 4.0)
# The demo's filter_func: embeddings, the first and last conv, shortcut convs, the transformer
# output projections and the output norm stay in high precision.
DEFAULT_EXCLUDE = ("time_emb_proj", "time_embedding", "conv_in", "conv_out", "conv_shortcut", "add_embedding",
                   "pos_embed", "time_text_embed", "context_embedder", "norm_out", "proj_out")
QKV_LEAVES = ("to_q", "to_k", "to_v", "to_qkv", "to_kv")  # separate and fused projections


@dataclass(frozen=True)
class QuantizeConfig:
    onnx_path: Path
    output: Path
    precision: str = "int8"  # "int8" | "fp8"
    level: float | None = None  # None: 3 for int8, 4 for fp8
    calib: Path | None = None  # trtkit calibration file; None: max over a sample run
    include: tuple[str, ...] = ()  # module-name patterns quantized whatever the level or exclusions
    exclude: tuple[str, ...] = ()  # module-name patterns never quantized (added to the defaults)
    profile: str = "tiny-256"  # sample-input shapes for max calibration
    fp16: bool = True  # convert everything else to strongly typed FP16
    quantize_attention: bool | None = None  # None: FP8 at level >= 4 only
    default_exclusions: bool = True
    io_dtype: str = "float32"  # graph input/output type after the FP16 conversion
    seed: int = 0


@dataclass(frozen=True)
class Decision:
    module: str
    kind: str  # linear | conv | attention
    quantized: bool
    reason: str
    type: str | None = None  # int8 | fp8 where quantized
    amax: float | None = None  # activation amax used (attention: the q input's)
    amax_source: str | None = None  # "calibration" | "sample run" | "fixed"


def matches_pattern(name: str, pattern: str) -> bool:
    """Glob (`*attn2*`) when the pattern has wildcards, else a substring of the module name (the
    demo's `.*(conv_in|...).*` regex works the same way)."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def _first_match(name: str, pats: Iterable[str]) -> str | None:
    return next((p for p in pats if matches_pattern(name, p)), None)


def check_patterns(modules: Iterable[str], cfg: QuantizeConfig) -> None:
    """An --exclude/--include pattern that matches no module is an error, not a no-op: a typo
    (`--exclude atn1`) would otherwise quantize what the user meant to keep, and nothing would say so."""
    names = sorted(set(modules))
    for flag, pats in (("--exclude", cfg.exclude), ("--include", cfg.include)):
        for p in pats:
            if _first_match_any(names, p):
                continue
            parts = sorted({part for n in names for part in n.split(".")})
            close = difflib.get_close_matches(p.strip("*?[]"), parts, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            example = f" (e.g. {names[0]})" if names else ""
            raise TrtkitError(f"{flag} {p!r} matches no quantizable module; {hint}module names are dotted paths"
                              f"{example}")


def _first_match_any(names: Iterable[str], pattern: str) -> bool:
    return any(matches_pattern(n, pattern) for n in names)


def resolve_level(precision: str, level: float | None) -> float:
    if level is None:
        return 4.0 if precision == "fp8" else 3.0
    lv = float(level)
    if lv not in LEVELS:
        raise TrtkitError(f"quantization level {level:g} is not one of {', '.join(f'{x:g}' for x in LEVELS)}")
    return lv


def _level_admits(m: WeightedMatch, level: float) -> tuple[bool, str]:
    if m.kind == "conv":
        return True, "conv (level >= 1)"
    leaf = m.module.split(".")[-1]
    if level >= 3:
        return True, "linear (level >= 3)"
    if level >= 2.5 and leaf in QKV_LEAVES:
        return True, "q/k/v projection (level >= 2.5)"
    if level >= 2 and "ff.net" in m.module:
        return True, "feed-forward linear (level >= 2)"
    need = 2 if "ff.net" in m.module else 2.5 if leaf in QKV_LEAVES else 3
    return False, f"level {level:g} quantizes no such linear (needs level >= {need:g})"


def _unet_exclusion(module: str) -> str | None:
    p = _first_match(module, DEFAULT_EXCLUDE)
    return None if p is None else f"default exclusion ({p})"


@dataclass(frozen=True)
class Rules:
    """A model family's default exclusions (module -> reason, or None) and level rule."""

    exclusion: Callable[[str], str | None]
    admits: Callable[[WeightedMatch, float], tuple[bool, str]]


UNET_RULES = Rules(_unet_exclusion, _level_admits)


def decide(matches: Matches, cfg: QuantizeConfig, level: float, rules: Rules = UNET_RULES) -> dict[str, Decision]:
    """Per module: quantize or not, and why. Explicit exclude beats include beats defaults and level."""
    check_patterns(matches.modules(), cfg)
    out: dict[str, Decision] = {}
    for m in (*matches.conv, *matches.linear):
        if (p := _first_match(m.module, cfg.exclude)) is not None:
            out[m.module] = Decision(m.module, m.kind, False, f"excluded by --exclude {p}")
        elif (p := _first_match(m.module, cfg.include)) is not None:
            out[m.module] = Decision(m.module, m.kind, True, f"included by --include {p}", cfg.precision)
        elif cfg.default_exclusions and (why := rules.exclusion(m.module)) is not None:
            out[m.module] = Decision(m.module, m.kind, False, why)
        else:
            ok, why = rules.admits(m, level)
            out[m.module] = Decision(m.module, m.kind, ok, why, cfg.precision if ok else None)
    want_attn = cfg.quantize_attention if cfg.quantize_attention is not None else (
        cfg.precision == "fp8" and level >= 4)
    for a in matches.attention:
        if (p := _first_match(a.module, cfg.exclude)) is not None:
            d = Decision(a.module, "attention", False, f"excluded by --exclude {p}")
        elif not want_attn and _first_match(a.module, cfg.include) is None:
            if cfg.precision == "int8":
                why = "INT8 leaves attention in FP16 (--attention forces it; in Python quantize_attention=True)"
            else:
                why = f"level {level:g} leaves attention unquantized (FP8 attention is level 4)"
            d = Decision(a.module, "attention", False, why)
        elif a.head_size is None:
            d = Decision(a.module, "attention", False, "head size unknown: cannot check the fused-attention rule")
        elif a.head_size % 16:
            d = Decision(a.module, "attention", False,
                         f"head size {a.head_size} is not a multiple of 16 (TensorRT fused 8-bit attention)")
        else:
            d = Decision(a.module, "attention", True, f"attention BMMs and softmax (head size {a.head_size})",
                         cfg.precision)
        out[a.module] = d
    return out



def with_amax(d: Decision, amax: float, source: str) -> Decision:
    return replace(d, amax=float(amax), amax_source=source)
