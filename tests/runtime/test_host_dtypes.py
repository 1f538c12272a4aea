"""Host <-> engine bits (finding 5): BF16 and FP8 I/O are encoded as float bits, checked against torch's own
casts (the loop's bf16 conditioning, graph_runner._DeviceLoop.set, uses the same function)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trtkit.runtime.host_dtypes import decode, encode, storage_dtype
from trtkit.runtime.plan import EngineError


def values() -> np.ndarray:
    rng = np.random.default_rng(0)
    v = rng.standard_normal(4096).astype(np.float32) * 10
    return np.concatenate([v, np.float32([0.0, -0.0, 0.7, 1 / 3, 448.0, -448.0, 1e-3, 65504.0])])


@pytest.mark.parametrize("dtype,torch_dtype,bits", [("bfloat16", torch.bfloat16, torch.int16),
                                                     ("float8_e4m3fn", torch.float8_e4m3fn, torch.uint8)])
def test_encode_matches_torch_casts(dtype: str, torch_dtype: torch.dtype, bits: torch.dtype) -> None:
    v = values()
    if dtype == "float8_e4m3fn":
        v = np.clip(v, -448, 448)  # e4m3fn has no infinity: out-of-range values are the caller's business
    raw = encode(v, dtype)
    assert raw.dtype == storage_dtype(dtype) and raw.shape == v.shape
    want = torch.from_numpy(v).to(torch_dtype).view(bits).numpy().view(raw.dtype)
    np.testing.assert_array_equal(raw, want)
    np.testing.assert_array_equal(decode(raw, dtype), torch.from_numpy(v).to(torch_dtype).float().numpy())


def test_integer_cast_was_wrong() -> None:
    """What the old code did: np.asarray(x, dtype=uint16) truncates 0.7 to 0 and -1.5 to garbage."""
    v = np.float32([0.7, -1.5, 3.0])
    assert decode(encode(v, "bfloat16"), "bfloat16").tolist() == pytest.approx([0.69921875, -1.5, 3.0])
    assert np.asarray(v).astype(np.uint16).tolist()[0] == 0


def test_other_dtypes_pass_through() -> None:
    ids = encode([[49406, 320, 49407]], "int32")
    assert ids.dtype == np.int32 and decode(ids, "int32") is not None
    assert encode(np.float32([1.5]), "float16").dtype == np.float16
    with pytest.raises(EngineError, match="no host storage for engine dtype int4"):
        storage_dtype("int4")

