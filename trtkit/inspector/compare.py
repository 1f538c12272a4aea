"""Two engines side by side from what their metadata and plan headers say. This is all `inspect a.plan
b.plan` can show where neither plan has layer information (a CPU-only machine): without it, two empty
layer tables and "0 compute nodes matched; 0 differ" read as "identical"."""

from __future__ import annotations

from pathlib import Path

from trtkit.inspector.plan_file import meta_backend
from trtkit.inspector.report import EngineReport, _precision, metadata_summary


def facts(r: EngineReport) -> dict[str, str]:
    """(label -> text) for one engine: backend, precision, plan size, then every metadata row."""
    built_by, version = meta_backend(r.src.metadata)
    out = {"backend": f"{built_by or r.src.header.flavour} {version or r.src.header.version_str or '?'}",
           "precision": _precision(r.src.metadata) or "? (no metadata)",
           "plan size": f"{r.src.plan.stat().st_size / 2**20:.1f} MiB"}
    for label, text in metadata_summary(r.src.metadata):
        if label not in ("plan size", "built with"):
            out[label] = text
    return out


def side_by_side(a: EngineReport, b: EngineReport) -> list[tuple[str, str, str, bool]]:
    """(label, A, B, same) for every fact either engine has; "-" where one lacks it."""
    fa, fb = facts(a), facts(b)
    return [(k, fa.get(k, "-"), fb.get(k, "-"), fa.get(k) == fb.get(k)) for k in dict.fromkeys([*fa, *fb])]


def without_layers(a: EngineReport, b: EngineReport) -> list[str]:
    """"A" / "B" for each engine without layer information (then there is nothing to match layer by layer)."""
    return [name for name, r in (("A", a), ("B", b)) if not r.layers]


def same_file(a: Path, b: Path) -> bool:
    """Byte-identical plans (the same file twice, or a copy)."""
    if a.resolve() == b.resolve():
        return True
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True
