"""The flat rows of the inspector's reports (ONNX nodes, attention cores, engine tensors, cross-checks) as
JSON: each row's dataclass fields in order, tuples as lists. One rule instead of a hand-written dict per row,
so a field added to a row cannot be left out of its JSON."""

from __future__ import annotations

import dataclasses
from typing import Any


class JsonRow:
    """Base of a flat frozen dataclass row; `to_json()` gives its fields."""

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # subclasses are dataclasses
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out
