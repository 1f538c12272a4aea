"""The runtime's decisions (plan.py) against the metadata and headers of real TensorRT-RTX plans built in this
test run (tests/conftest.py, tests/runtime/conftest.py): profiles, buffer shapes, backend, dtypes, the shared
activation area, error lines. What TensorRT itself would do with them is tested in test_engine.py (`tensorrt`)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from trtkit.errors import TrtkitError
from trtkit.runtime.plan import (
    EngineDesc,
    EngineError,
    TensorSpec,
    area_after,
    check_supported,
    choose_backend,
    dtype_name,
    error_lines,
    max_input_shapes,
    max_over,
    nbytes,
    pick_profile,
)

pytestmark = pytest.mark.rtx


def unet_call(b: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
    """The shapes the loop binds for a batch of b (guidance pairs included) and an h x w latent."""
    return {"sample": (b, 4, h, w), "timestep": (1,), "encoder_hidden_states": (b, 77, 64), "text_embeds": (b, 32),
            "time_ids": (b, 6)}


@pytest.fixture(scope="module", params=["fp16", "int8", "fp8"])
def unet(request: pytest.FixtureRequest, rtx_unet_plans: dict[str, dict[str, Any]]) -> EngineDesc:
    return EngineDesc.from_metadata(rtx_unet_plans[request.param]["meta"], "unet")


def test_metadata_describes_the_plan(unet: EngineDesc) -> None:
    assert unet.backend == "rtx" and [p.name for p in unet.profiles] == ["tiny-256", "shapes"]
    assert unet.inputs == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert unet.outputs == ["noise_pred"] and unet.tensor("sample").dtype == "float32"
    assert unet.profiles[0].ranges["sample"] == ((2, 4, 32, 32), (2, 4, 32, 32), (8, 4, 32, 32))


def test_first_covering_profile_is_picked(unet: EngineDesc) -> None:
    """Finding 2: a 16x16 latent only the second profile covers runs on profile 1 (it was refused)."""
    assert pick_profile(unet, unet_call(2, 32, 32)) == 0
    assert pick_profile(unet, unet_call(8, 32, 32)) == 0
    assert pick_profile(unet, unet_call(2, 16, 16)) == 1


def test_no_covering_profile_names_every_profile(unet: EngineDesc) -> None:
    with pytest.raises(EngineError) as e:
        pick_profile(unet, unet_call(4, 16, 16))
    msg = str(e.value)
    assert "no optimization profile covers" in msg and "\n" not in msg
    assert "tiny-256: sample min 2x4x32x32, max 8x4x32x32" in msg and "shapes: sample min 2x4x16x16" in msg


@pytest.mark.parametrize("shapes,match", [
    ({**unet_call(2, 32, 32), "sample": (2, 4, 32)}, "rank 3"),
    ({**unet_call(2, 32, 32), "sample": (2, 3, 32, 32)}, "dimension 1 is fixed to 4"),
    ({k: v for k, v in unet_call(2, 32, 32).items() if k != "timestep"}, "timestep not given"),
    ({**unet_call(2, 32, 32), "latent": (1,)}, "has no input latent"),
])
def test_call_errors_are_one_line(unet: EngineDesc, shapes: dict, match: str) -> None:
    with pytest.raises(EngineError, match=match) as e:
        pick_profile(unet, shapes)
    assert isinstance(e.value, TrtkitError) and "\n" not in str(e.value)


def test_buffers_hold_every_profile(unet: EngineDesc) -> None:
    """Buffers are sized at the element-wise max over profiles (finding 2: they were sized at profile 0)."""
    ins = max_input_shapes(unet)
    assert ins["sample"] == (8, 4, 32, 32) and ins["timestep"] == (1,) and ins["text_embeds"] == (8, 32)
    # outputs: what TensorRT infers per profile (noise_pred = sample here), max over profiles
    per = [{"noise_pred": (8, 4, 32, 32)}, {"noise_pred": (2, 4, 16, 16)}, {"noise_pred": (2, 4, 48, 8)}]
    assert max_over(per) == {"noise_pred": (8, 4, 48, 32)}
    assert nbytes(ins["sample"], unet.tensor("sample").dtype) == 8 * 4 * 32 * 32 * 4


def test_backend_comes_from_the_plan(rtx_unet_plans: dict[str, dict[str, Any]]) -> None:
    """Finding 3: an RTX plan is run by TensorRT-RTX whatever is installed; a contradicting request is one line."""
    from trtkit.inspector.plan_file import meta_backend, read_plan_header

    plan: Path = rtx_unet_plans["fp16"]["plan"]
    meta = rtx_unet_plans["fp16"]["meta"]
    flavour = read_plan_header(plan).flavour
    assert flavour == "rtx" and meta_backend(meta)[0] == "rtx"
    assert choose_backend(plan.name, flavour, None, None) == "rtx"
    assert choose_backend(plan.name, None, meta_backend(meta)[0], None) == "rtx"
    assert choose_backend(plan.name, flavour, "rtx", "rtx") == "rtx"
    with pytest.raises(EngineError, match="unet.plan was built by TensorRT-RTX; backend trt cannot run it") as e:
        choose_backend(plan.name, flavour, None, "trt")
    assert "\n" not in str(e.value)
    with pytest.raises(EngineError, match="cannot tell which TensorRT"):
        choose_backend(plan.name, None, None, None)


def test_engine_load_refuses_a_contradicting_backend(rtx_unet_plans: dict[str, dict[str, Any]]) -> None:
    """Engine.load decides before importing any backend: --backend trt on an RTX plan fails with one line."""
    from trtkit.runtime.engine import Engine

    with pytest.raises(EngineError, match="built by TensorRT-RTX; backend trt cannot run it"):
        Engine.load(rtx_unet_plans["fp16"]["plan"], backend="trt")


def test_bf16_io_from_real_metadata(rtx_bf16_plan: dict[str, Any]) -> None:
    """Finding 5's data: x.json says "bf16", the runtime stores it in uint16 and encodes real floats."""
    from trtkit.runtime.host_dtypes import decode, encode, storage_dtype

    d = EngineDesc.from_metadata(rtx_bf16_plan["meta"], "relu")
    assert d.tensor("x").dtype == d.tensor("y").dtype == "bfloat16"
    assert storage_dtype("bfloat16").itemsize == 2 and nbytes((4, 64), "bfloat16") == 512
    assert decode(encode([0.7, -1.5], "bfloat16"), "bfloat16").tolist() == pytest.approx([0.69921875, -1.5])
    assert pick_profile(d, {"x": (1, 64)}) == 0 and max_input_shapes(d) == {"x": (4, 64)}


def test_sub_byte_io_is_refused_in_one_line(rtx_unet_plans: dict[str, dict[str, Any]]) -> None:
    """Finding 11: INT4 / FP4 / E8M0 I/O (a numpy TypeError before) is refused when the engine is described."""
    d = EngineDesc.from_metadata(rtx_unet_plans["fp16"]["meta"], "unet")
    check_supported(d)
    for trt_name in ("INT4", "FP4", "E8M0"):
        bad = dataclasses.replace(d, tensors=tuple(TensorSpec(t.name, t.is_input, dtype_name(trt_name), t.shape)
                                                   if t.name == "noise_pred" else t for t in d.tensors))
        with pytest.raises(EngineError, match=f"noise_pred \\({trt_name.lower()}\\) is not supported") as e:
            check_supported(bad)
        assert "\n" not in str(e.value)


def test_dtype_names_from_both_sources() -> None:
    """x.json writes TensorRT's member names lower-cased, the engine gives them upper-cased: one mapping."""
    for name, want in [("float", "float32"), ("HALF", "float16"), ("bf16", "bfloat16"), ("FP8", "float8_e4m3fn"),
                       ("int32", "int32"), ("DataType.INT64", "int64"), ("int4", "int4")]:
        assert dtype_name(name) == want


def test_shared_area_allows_a_first_engine_without_memory() -> None:
    """Finding 12: an engine needing 0 bytes attached first keeps the area empty (it asserted before)."""
    size = 0
    sizes = []
    for need in (0, 0, 4096, 512, 0):
        size = area_after(size, need)
        sizes.append(size)
    assert sizes == [0, 0, 4096, 4096, 4096]


def test_error_lines_keep_errors_only() -> None:
    """Finding 7: a failed deserialization quotes TensorRT's ERROR lines, not the INFO/VERBOSE noise after them."""
    msgs = [(logging.INFO, "loaded"), (logging.ERROR, "Serialization assertion magicTagRead failed"),
            (logging.DEBUG, "verbose 1"), (logging.CRITICAL, "internal error"), (logging.WARNING, "warn"),
            (logging.INFO, "info 2")]
    assert error_lines(msgs) == ["Serialization assertion magicTagRead failed", "internal error"]
