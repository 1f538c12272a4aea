"""Real builds with TensorRT-RTX on the CPU (one target, SM89): the tiny UNet in FP16, INT8 and FP8
with two optimization profiles, the cache, and every failure leaving nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
from builder_models import LINEAR_SHAPES, make_linear, sd15_like
from onnx import helper

from trtkit._files import sha256_files
from trtkit.builder.build import BuildResult, build
from trtkit.builder.config import BuildConfig
from trtkit.builder.progress import BuildProgress
from trtkit.errors import TrtkitError

pytestmark = pytest.mark.rtx

TARGET = ("8.9",)
SMALL = "sample:2x4x16x16,timestep:1,encoder_hidden_states:2x77x64,text_embeds:2x32,time_ids:2x6"
UNET_INPUTS = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]


def config(onnx: Path, out: Path, **kw) -> BuildConfig:  # type: ignore[no-untyped-def]
    args = dict(onnx=onnx, output=out, profiles=("tiny-256", SMALL), target_cc=TARGET, progress=False) | kw
    return BuildConfig(**args)


def assert_nothing_left(out: Path) -> None:
    """No plan, no metadata, no temporary file or work folder beside where the plan would be."""
    assert not out.exists() and not out.with_suffix(".json").exists()
    if out.parent.exists():
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def check_metadata(r: BuildResult, onnx: Path, precision: str, qdq: list[str]) -> dict:
    doc = json.loads(r.metadata.read_text())
    assert doc["format"] == "trtkit-engine" and doc["cache_key"] == r.cache_key
    assert doc["backend"]["name"] == "rtx" and doc["backend"]["module"] == "tensorrt_rtx"
    assert doc["target"] == {"compute_capabilities": ["8.9"], "default_targets": False}
    assert doc["precision"]["requested"] == precision and doc["precision"]["qdq_types"] == qdq
    assert doc["precision"]["strongly_typed"] is True and doc["precision"]["builder_flags"] == []
    # RTX builds are stream-capturable (review finding 4): REQUIRE_USER_ALLOCATION, recorded.
    assert doc["builder_flags"] == ["REQUIRE_USER_ALLOCATION"]
    assert [p["name"] for p in doc["profiles"]] == ["tiny-256", "shapes"]
    assert doc["profiles"][0]["shapes"]["sample"] == {"min": [2, 4, 32, 32], "opt": [2, 4, 32, 32],
                                                      "max": [8, 4, 32, 32]}
    assert doc["profiles"][1]["shapes"]["sample"] == {"min": [2, 4, 16, 16], "opt": [2, 4, 16, 16],
                                                      "max": [2, 4, 16, 16]}
    ins = {t["name"]: t for t in doc["io"]["inputs"]}
    assert list(ins) == UNET_INPUTS
    assert ins["sample"]["shape"] == [-1, 4, -1, -1] and ins["sample"]["dtype"] == "float"
    assert doc["io"]["outputs"] == [{"name": "noise_pred", "shape": [-1, 4, -1, -1], "dtype": "float"}]
    assert doc["onnx"]["sha256"] == sha256_files([onnx]) and doc["onnx"]["component"] == "unet"
    assert doc["settings"]["opt_level"] == (4 if precision in ("int8", "fp8") else 3)
    assert doc["settings"]["profiling_verbosity"] == "DETAILED"
    assert doc["plan"]["bytes"] == r.plan.stat().st_size and doc["plan"]["sha256"] == hashlib.sha256(r.plan.read_bytes()).hexdigest()
    assert 0 < doc["build_seconds"] == pytest.approx(r.build_seconds, abs=1e-3)
    assert doc["trtkit_version"] and doc["backend"]["version"]
    # No GPU here: the layer JSON cannot be made, and the metadata says why.
    assert doc["layers"]["saved"] is (r.layers is not None)
    if r.layers is None:
        assert doc["layers"]["reason"].startswith("not saved:") and doc["layers"]["shapes"] is None
    return doc


@pytest.fixture(scope="module")
def fp16_build(rtx_unet_builds: dict) -> tuple[BuildConfig, BuildResult]:
    pytest.importorskip("trtkit.graph.fp16")
    return rtx_unet_builds["fp16"]  # built once per session, shared with the runtime's tests



def test_fp16_two_profiles(fp16_build: tuple[BuildConfig, BuildResult], tiny_unet_onnx: Path) -> None:
    cfg, r = fp16_build
    assert not r.cached and r.plan == cfg.output and r.plan.stat().st_size > 1 << 20
    assert r.profiles == ["tiny-256", "shapes"]
    doc = check_metadata(r, tiny_unet_onnx, "fp16", [])
    assert any("FP16 graph conversion" in n for n in doc["notes"])
    assert doc["onnx"]["dims_from"].startswith("model folder")


def test_second_build_is_cache_hit(fp16_build: tuple[BuildConfig, BuildResult]) -> None:
    cfg, first = fp16_build
    mtime = cfg.output.stat().st_mtime_ns
    r = build(cfg)
    assert r.cached and r.cache_key == first.cache_key and r.seconds < 10
    assert r.build_seconds == pytest.approx(first.build_seconds, abs=1e-3)
    assert cfg.output.stat().st_mtime_ns == mtime  # not rewritten


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_8bit_two_profiles(precision: str, tiny_unet_onnx: Path, rtx_unet_builds: dict) -> None:
    pytest.importorskip("trtkit.graph.qdq")
    _, r = rtx_unet_builds[precision]  # built once per session (tests/conftest.py), with `config()`'s settings
    doc = check_metadata(r, tiny_unet_onnx, precision, [precision])
    assert doc["precision"]["fp16_rest"] is True
    assert any(f"{precision} Q/DQ pass applied" in n for n in doc["notes"])
    assert (doc["calib"] is not None) is (precision == "int8")
    assert doc["target"]["compute_capabilities"] == ["8.9"]
    # Newcomer trial P7: the Q/DQ graph TensorRT parsed is kept beside the plan and recorded, and inspect
    # cross-checks against it by default (it used to say "unet.onnx has no Q/DQ").
    from trtkit.builder.source import read_onnx
    from trtkit.inspector.report import engine_report

    kept = r.plan.parent / "unet.qdq.onnx"
    assert doc["qdq_onnx"] == {"path": "unet.qdq.onnx", "sha256": sha256_files([kept]), "files": ["unet.qdq.onnx"]}
    assert read_onnx(kept).qdq_types == (precision,)
    assert sorted(p.name for p in r.plan.parent.iterdir()) == ["unet.json", "unet.plan", "unet.qdq.onnx"]
    report = engine_report(r.plan)
    assert report.onnx is not None and report.onnx.path == kept and report.onnx.quantized
    assert not any("has no Q/DQ" in n for n in report.notes)


@pytest.mark.parametrize("qdq", ["int8", "fp8"])
def test_prequantized_onnx_built_as_given(qdq: str, tmp_path: Path) -> None:
    onnx = make_linear(tmp_path / "in" / "m.onnx", qdq, external=True)
    r = build(BuildConfig(onnx=onnx, output=tmp_path / "e.plan", shapes=LINEAR_SHAPES, precision=qdq,
                          target_cc=TARGET, progress=False))
    doc = json.loads(r.metadata.read_text())
    assert doc["precision"]["qdq_types"] == [qdq] and doc["precision"]["fp16_rest"] is False
    assert doc["onnx"]["files"] == ["m.onnx", "m.onnx.data"]
    assert doc["onnx"]["sha256"] == sha256_files([onnx, onnx.parent / "m.onnx.data"])
    assert "the ONNX already has" in doc["notes"][0] and doc["calib"] is None


def test_prequantized_onnx_without_flag_is_labelled_8bit(tmp_path: Path) -> None:
    """Newcomer trial P11: a Q/DQ ONNX built without --int8 was labelled fp32 everywhere."""
    from trtkit.inspector.report import engine_report

    onnx = make_linear(tmp_path / "in" / "m.onnx", "int8")
    r = build(BuildConfig(onnx=onnx, output=tmp_path / "e.plan", shapes=LINEAR_SHAPES, target_cc=TARGET,
                          progress=False))
    assert r.precision == "int8"
    doc = json.loads(r.metadata.read_text())
    assert doc["precision"]["requested"] == "fp32" and doc["precision"]["engine"] == "int8"
    assert "Q/DQ nodes: an int8 engine" in doc["notes"][0]
    assert engine_report(r.plan).to_json()["precision"] == "int8 (Q/DQ int8)"


def test_cache_key_follows_inputs_and_settings(tmp_path: Path) -> None:
    onnx = make_linear(tmp_path / "in" / "m.onnx", "int8")
    base = dict(onnx=onnx, output=tmp_path / "e.plan", shapes=LINEAR_SHAPES, precision="int8", target_cc=TARGET,
                progress=False)
    first = build(BuildConfig(**base))
    assert build(BuildConfig(**base)).cached
    assert build(BuildConfig(**base, force=True)).cached is False
    for change in (dict(opt_level=2), dict(workspace="256M"), dict(shapes="x:8x64")):
        r = build(BuildConfig(**(base | change)))
        assert not r.cached and r.cache_key != first.cache_key
    make_linear(onnx, "int8", hidden=64)  # same bytes: still a hit
    assert build(BuildConfig(**(base | dict(shapes="x:8x64")))).cached


def test_default_and_fp8_targets(tmp_path: Path) -> None:
    onnx = make_linear(tmp_path / "in" / "m.onnx", "fp8")
    r = build(BuildConfig(onnx=onnx, output=tmp_path / "e.plan", shapes=LINEAR_SHAPES, precision="fp8",
                          progress=False))
    assert json.loads(r.metadata.read_text())["target"] == {"compute_capabilities": ["8.9", "12.0"],
                                                            "default_targets": False}


def test_timing_cache_is_ignored_on_rtx(tmp_path: Path) -> None:
    onnx = make_linear(tmp_path / "in" / "m.onnx")
    r = build(BuildConfig(onnx=onnx, output=tmp_path / "e.plan", shapes=LINEAR_SHAPES, target_cc=TARGET,
                          timing_cache=tmp_path / "t.cache", workspace="64M", progress=False))
    assert not (tmp_path / "t.cache").exists()
    doc = json.loads(r.metadata.read_text())
    assert any("--timing-cache ignored" in n for n in doc["notes"])
    assert doc["settings"]["timing_cache"] is None and doc["settings"]["workspace"] == 64 << 20


# --------------------------------------------------------------------------- failures leave nothing


def test_wrong_profile_name(tiny_unet_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "e" / "unet.plan"
    with pytest.raises(TrtkitError, match="unknown profile 'sdxl-2048'; known profiles: "):
        build(config(tiny_unet_onnx, out, profiles=("sdxl-2048",)))
    assert_nothing_left(out)


def test_profile_input_missing_from_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "unet.plan"
    with pytest.raises(TrtkitError, match="'text_embeds' is not an input of sd15.onnx"):
        build(config(sd15_like(tmp_path / "sd15.onnx"), out, profiles=("tiny-256",), model_dir=tiny_model_dir))
    assert_nothing_left(out)


def test_malformed_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "unet.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 100)
    out = tmp_path / "unet.plan"
    with pytest.raises(TrtkitError, match="not a readable ONNX model"):
        build(config(bad, out))
    assert_nothing_left(out)


def test_int8_without_calibration(tiny_unet_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "unet.plan"
    with pytest.raises(TrtkitError, match="--int8 needs calibration .* trtkit calibrate MODEL_DIR -o calib.json"):
        build(config(tiny_unet_onnx, out, precision="int8"))
    assert_nothing_left(out)


def test_missing_calibration_file(tiny_unet_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "unet.plan"
    with pytest.raises(TrtkitError, match="calibration file .* does not exist"):
        build(config(tiny_unet_onnx, out, precision="int8", calib=tmp_path / "nope.json"))
    assert_nothing_left(out)


def test_qdq_type_mismatch(tmp_path: Path) -> None:
    onnx = make_linear(tmp_path / "m.onnx", "int8")
    with pytest.raises(TrtkitError, match="already has int8 Q/DQ nodes, not fp8"):
        build(BuildConfig(onnx=onnx, output=tmp_path / "e.plan", shapes=LINEAR_SHAPES, precision="fp8"))
    assert_nothing_left(tmp_path / "e.plan")


def test_parser_error(tmp_path: Path) -> None:
    bad = helper.make_node("NoSuchOp", ["r"], ["y"], name="/unet/custom/NoSuchOp", domain="custom.domain")
    onnx = make_linear(tmp_path / "m.onnx", extra_node=bad)
    out = tmp_path / "e.plan"
    with pytest.raises(TrtkitError, match=r"cannot parse m.onnx: node /unet/custom/NoSuchOp \(NoSuchOp\)"):
        build(BuildConfig(onnx=onnx, output=out, shapes=LINEAR_SHAPES, target_cc=TARGET, progress=False))
    assert_nothing_left(out)


class CancelAfter(BuildProgress):
    """Cancels (directly, or by sending this process SIGINT) once the build has made `n` steps."""

    def __init__(self, n: int, sigint: bool) -> None:
        super().__init__()
        self.n, self.sigint = n, sigint

    def step_complete(self, phase_name: str, step: int) -> bool:
        if self.steps == self.n and not self.cancelled:
            if self.sigint:
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C; the handler runs at the next bytecode
            else:
                self.cancel("asked")
        return super().step_complete(phase_name, step)


@pytest.mark.parametrize("sigint", [False, True], ids=["cancel", "ctrl-c"])
def test_cancel_leaves_old_plan_alone(sigint: bool, tmp_path: Path) -> None:
    onnx = make_linear(tmp_path / "in" / "m.onnx", "int8")
    base = dict(onnx=onnx, output=tmp_path / "e.plan", shapes=LINEAR_SHAPES, precision="int8", target_cc=TARGET,
                progress=False)
    first = build(BuildConfig(**base))
    plan, meta = first.plan.read_bytes(), first.metadata.read_text()
    handler = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    progress = CancelAfter(3, sigint)
    with pytest.raises(TrtkitError, match="build cancelled"):
        build(BuildConfig(**base, force=True), progress=progress)
    assert progress.cancelled and progress.steps >= 3
    assert first.plan.read_bytes() == plan and first.metadata.read_text() == meta  # the old build is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".e.plan")] == []
    assert signal.getsignal(signal.SIGINT) is handler  # the build put back what it found


class OtherBuildFinishes(BuildProgress):
    """Stands for a second `trtkit build` to the same path that finishes while this one runs."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def step_complete(self, phase_name: str, step: int) -> bool:
        if self.steps == 3:
            self.out.write_bytes(b"the other build's plan")
            self.out.with_suffix(".json").write_text('{"format": "trtkit-engine"}')
        return super().step_complete(phase_name, step)


def test_concurrent_build_to_the_same_path_says_so(tmp_path: Path) -> None:
    """Newcomer trial P16: two builds to one path both exit 0, silently. Decided: the last to finish wins,
    its plan and metadata move in together under a lock on the folder, and it says it replaced another's."""
    onnx = make_linear(tmp_path / "in" / "m.onnx", "int8")
    out = tmp_path / "e.plan"
    r = build(BuildConfig(onnx=onnx, output=out, shapes=LINEAR_SHAPES, precision="int8", target_cc=TARGET,
                          progress=False), progress=OtherBuildFinishes(out))
    assert any("another build wrote e.plan while this one ran" in n for n in r.notes)
    doc = json.loads(r.metadata.read_text())
    assert doc["plan"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()  # one build's pair


def test_cancelled_tiny_unet_leaves_nothing(tiny_unet_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "unet.plan"
    with pytest.raises(TrtkitError, match="build cancelled"):
        build(config(tiny_unet_onnx, out), progress=CancelAfter(50, sigint=True))
    assert_nothing_left(out)


def test_prequantized_fp8_needs_ada_targets(tmp_path: Path) -> None:
    onnx = make_linear(tmp_path / "m.onnx", "fp8")
    with pytest.raises(TrtkitError, match="has FP8 Q/DQ, which needs compute capability 8.9 or later"):
        build(BuildConfig(onnx=onnx, output=tmp_path / "e.plan", shapes=LINEAR_SHAPES, target_cc=("8.6",)))
    assert_nothing_left(tmp_path / "e.plan")
    r = build(BuildConfig(onnx=onnx, output=tmp_path / "e.plan", shapes=LINEAR_SHAPES, progress=False))  # as given
    assert json.loads(r.metadata.read_text())["target"]["compute_capabilities"] == ["8.9", "12.0"]


def test_fp8_on_a_gpu_below_ada_is_refused_before_the_build() -> None:
    """Review finding 14: full TensorRT builds for the GPU it runs on; FP8 needs 8.9 or later."""
    from trtkit.builder.config import fp8_gpu_error

    for cc in ((8, 0), (8, 6), (7, 5)):
        msg = fp8_gpu_error("fp8", (), "trt", cc)
        assert msg and f"{cc[0]}.{cc[1]}" in msg and "\n" not in msg
    assert "FP8 Q/DQ" in (fp8_gpu_error("fp16", ("fp8",), "trt", (8, 6)) or "")  # an ONNX arriving with FP8 Q/DQ
    for cc in ((8, 9), (9, 0), (10, 0), (12, 0)):
        assert fp8_gpu_error("fp8", ("fp8",), "trt", cc) is None
    assert fp8_gpu_error("int8", ("int8",), "trt", (8, 0)) is None
    assert fp8_gpu_error("fp8", (), "rtx", (8, 0)) is None  # RTX builds AOT for --target-cc (checked elsewhere)
    assert fp8_gpu_error("fp8", (), "trt", None) is None  # no GPU: refused by the backend check instead


def test_rtx_build_flags_from_the_installed_module() -> None:
    from trtkit.backend import load_backend
    from trtkit.builder.build import rtx_build_flags

    trt = load_backend("rtx").trt
    assert rtx_build_flags(trt) == ["REQUIRE_USER_ALLOCATION"]
    cfg = trt.Builder(load_backend("rtx").logger).create_builder_config()
    for f in rtx_build_flags(trt):
        cfg.set_flag(getattr(trt.BuilderFlag, f))
    assert cfg.get_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)


def test_refused_compute_capability_is_one_line() -> None:
    """Review finding 10: set_compute_capability returns False (it does not raise); checked."""
    from trtkit.backend import load_backend
    from trtkit.builder.network import set_rtx_targets

    be = load_backend("rtx")
    cfg = be.trt.Builder(be.logger).create_builder_config()
    with pytest.raises(TrtkitError, match="refused target compute capability current"):
        set_rtx_targets(be, cfg, ("8.9", "current"))  # BuildConfig forbids it; here TensorRT-RTX refuses it
    set_rtx_targets(be, cfg, ("8.9", "12.0"))
