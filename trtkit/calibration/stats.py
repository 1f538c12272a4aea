"""Per-tensor, per-denoising-step statistics of the quantized inputs (what the hooks record).

For every key: `amax[key]`, an array [calibration passes, steps] of the input's absolute max in that
pass (one pipeline call over one prompt batch) at that denoising step (NaN where never seen). For
SmoothQuant candidates (INT8 linear inputs) also `chan[key]` [steps, channels], the per-input-channel
absolute max at each step (max over passes), and `sample[key]`, a reservoir of input rows (tokens)
drawn uniformly over every call, on which the per-layer alpha search measures quantized error.

Written by hand because ModelOpt's calibrators keep one reduced amax per quantizer (its
PercentileCalibrator keeps per-step sums but not per-pass values), and Percentile Quant and the
reduction choices need the raw per-pass, per-step table, which also makes the run resumable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trtkit._files import atomic_path


class StepStats:
    def __init__(self, steps: int, channel_keys: set[str] | frozenset[str] = frozenset(),
                 sample_rows: int = 128, rows_per_call: int = 4, seed: int = 0) -> None:
        self.steps = steps
        self.channel_keys = set(channel_keys)
        self.sample_rows, self.rows_per_call = sample_rows, rows_per_call
        self.step = 0
        self.passes = 0
        self.amax: dict[str, np.ndarray] = {}
        self.chan: dict[str, np.ndarray] = {}
        self.sample: dict[str, np.ndarray] = {}
        self.seen: dict[str, int] = {}
        self.rng = np.random.default_rng(seed)

    def begin_pass(self) -> None:
        """A new calibration pass (one prompt batch through every step) starts at step 0."""
        self.passes += 1
        self.step = 0

    def observe(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """The tap: record x at (current pass, current step); return x untouched."""
        if self.passes == 0:
            self.begin_pass()
        t = self.step
        if not 0 <= t < self.steps:
            return x  # e.g. a pipeline that calls the model once more after its last step
        xd = x.detach()
        ch = None
        if key in self.channel_keys:
            rows = xd.reshape(-1, xd.shape[-1]).float()
            ch = rows.abs().amax(0).cpu().numpy().astype(np.float64)
            a = float(ch.max())
        else:
            a = float(xd.abs().amax().float())
        table = self.amax.get(key)
        if table is None or table.shape[0] < self.passes:
            grown = np.full((self.passes, self.steps), np.nan, dtype=np.float64)
            if table is not None:
                grown[: table.shape[0]] = table
            self.amax[key] = table = grown
        cur = table[self.passes - 1, t]
        table[self.passes - 1, t] = a if np.isnan(cur) else max(cur, a)
        if ch is not None:
            if key not in self.chan:
                self.chan[key] = np.zeros((self.steps, ch.shape[0]))
            np.maximum(self.chan[key][t], ch, out=self.chan[key][t])
            self._reservoir(key, rows)
        return x

    def _reservoir(self, key: str, rows: torch.Tensor) -> None:
        pick = self.rng.choice(rows.shape[0], size=min(self.rows_per_call, rows.shape[0]), replace=False)
        new = rows[torch.as_tensor(pick)].cpu().numpy().astype(np.float32)
        buf = self.sample.get(key)
        seen = self.seen.get(key, 0)
        for r in new:
            if buf is None:
                buf = r[None].copy()
            elif buf.shape[0] < self.sample_rows:
                buf = np.concatenate([buf, r[None]])
            else:
                j = int(self.rng.integers(0, seen + 1))
                if j < self.sample_rows:
                    buf[j] = r
            seen += 1
        assert buf is not None
        self.sample[key], self.seen[key] = buf, seen

    # -- persistence (the resumable side file) --------------------------------------------------

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        arrays: dict[str, np.ndarray] = {}
        for k, v in self.amax.items():
            full = np.full((self.passes, self.steps), np.nan)
            full[: v.shape[0]] = v
            arrays[f"amax/{k}"] = full
        arrays.update({f"chan/{k}": v for k, v in self.chan.items()})
        arrays.update({f"sample/{k}": v for k, v in self.sample.items()})
        head = {"meta": meta, "steps": self.steps, "passes": self.passes, "seen": self.seen,
                "channel_keys": sorted(self.channel_keys), "sample_rows": self.sample_rows,
                "rows_per_call": self.rows_per_call}
        arrays["__head__"] = np.frombuffer(json.dumps(head).encode(), dtype=np.uint8)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(f, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path, seed: int = 0) -> tuple[StepStats, dict[str, Any]]:
        with np.load(path) as z:
            head = json.loads(bytes(z["__head__"]).decode())
            s = cls(head["steps"], set(head["channel_keys"]), head["sample_rows"], head["rows_per_call"],
                    seed=seed + head["passes"])
            s.passes, s.seen = head["passes"], {k: int(v) for k, v in head["seen"].items()}
            for name in z.files:
                kind, _, key = name.partition("/")
                if kind == "amax":
                    s.amax[key] = z[name]
                elif kind == "chan":
                    s.chan[key] = z[name]
                elif kind == "sample":
                    s.sample[key] = z[name]
        return s, head["meta"]
