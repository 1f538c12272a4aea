"""`trtkit run` and `trtkit bench`: on the CPU (eager loop, torch UNet), and compiled on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trtkit.cli import main


def test_run_writes_image(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "a.png"
    rc = main(["run", str(tiny_model_dir), "--prompt", "a cat", "--steps", "2", "--height", "64", "--width", "64",
               "--scheduler", "euler_a", "--device", "cpu", "--no-cuda-graph", "-o", str(out), "--json"])
    assert rc == 0 and out.is_file()
    info = json.loads(capsys.readouterr().out)
    assert info["executor"] == "torch" and info["cuda_graph"] is False


@pytest.mark.parametrize("args,match", [
    (["--scheduler", "lms"], "unknown scheduler"), (["--steps", "0"], "--steps"), (["--height", "100"], "multiples"),
    (["--height", "-64"], "positive multiples"), (["--width", "0"], "positive multiples"),  # a traceback / the default
    (["--engines", "/nonexistent"], "no unet.plan"), (["--kernels", "fast"], "--kernels must be one of plain, tuned"),
])
def test_run_errors_are_one_line(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                 args: list[str], match: str) -> None:
    out = tmp_path / "b.png"
    rc = main(["run", str(tiny_model_dir), "--prompt", "x", "--device", "cpu", "-o", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and match in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("args,match", [
    (["--backend", "cuda"], "--backend must be trt or rtx"),
    (["--backend", "rtx"], "--backend picks the TensorRT that runs --engines; give --engines too"),
])
def test_backend_errors_are_one_line(tiny_model_dir: Path, capsys: pytest.CaptureFixture, args: list[str],
                                     match: str) -> None:
    for verb in (["run", "--prompt", "x"], ["bench"]):
        rc = main([verb[0], str(tiny_model_dir), *verb[1:], "--device", "cpu", *args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and match in err and len(err.splitlines()) == 1


@pytest.mark.rtx
def test_backend_is_checked_against_the_plan(tiny_model_dir: Path, rtx_unet_plans: dict, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """Finding 3 through the CLI: an RTX-built unet.plan with --backend trt is refused in one line, before the
    pipeline loads; without --backend the plan's header picks TensorRT-RTX (then: no GPU here)."""
    import shutil

    folder = tmp_path / "engines"
    folder.mkdir()
    shutil.copy(rtx_unet_plans["fp16"]["plan"], folder / "unet.plan")
    out = tmp_path / "c.png"
    base = ["run", str(tiny_model_dir), "--prompt", "x", "--device", "cpu", "--engines", str(folder), "-o", str(out)]
    assert main([*base, "--backend", "trt"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unet.plan was built by TensorRT-RTX; backend trt cannot run it" in err and len(err.splitlines()) == 1
    assert main(base) == 2
    assert "TensorRT engines need a CUDA GPU" in capsys.readouterr().err and not out.exists()


def test_bench_prints_per_step_and_end_to_end(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["bench", str(tiny_model_dir), "--steps", "2", "--height", "64", "--width", "64", "--device", "cpu",
               "--warmup", "1", "--repeats", "2", "--json"])
    s = json.loads(capsys.readouterr().out)
    assert rc == 0 and s["repeats"] == 2 and s["per_step_ms"] > 0 and s["end_to_end_ms"] >= s["denoise_ms"]
    assert s["kernels"] == "plain"  # the tuned preset is for a GPU; on the CPU it is plain


@pytest.mark.gpu
def test_run_and_bench_compiled_on_a_gpu(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--compile on a GPU: the tuned preset under torch.compile (channels-last, fused q/k/v) in one CUDA graph, an
    image close to the plain eager UNet's."""
    import numpy as np
    from PIL import Image

    imgs = {}
    for name, extra in {"plain": ["--kernels", "plain"], "compiled": ["--compile"]}.items():
        out = tmp_path / f"{name}.png"
        rc = main(["run", str(tiny_model_dir), "--prompt", "a cat", "--steps", "4", "-o", str(out), "--json", *extra])
        info = json.loads(capsys.readouterr().out)
        assert rc == 0 and info["executor"] == "torch" and info["cuda_graph"] is True
        imgs[name] = np.asarray(Image.open(out), dtype=np.float32)
    diff = np.abs(imgs["compiled"] - imgs["plain"]).mean()
    assert diff < 4.0, diff  # of 255: fp16 rounding through other kernels, not another function
    rc = main(["bench", str(tiny_model_dir), "--steps", "4", "--compile", "--warmup", "1", "--repeats", "2", "--json"])
    s = json.loads(capsys.readouterr().out)
    assert rc == 0 and set(s["kernels"].split(",")) == {"channels_last", "nhwc_transformer", "fuse_qkv"}
    assert s["per_step_ms"] > 0


def test_run_without_output_never_replaces_out_png(tiny_model_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    """`trtkit run MODEL --prompt ...` twice in one folder (no -o): the second run replaced the first's out.png
    silently; it now writes out-1.png and says so. A folder as -o gets the same."""
    monkeypatch.chdir(tmp_path)
    args = ["run", str(tiny_model_dir), "--prompt", "a cat", "--steps", "1", "--height", "64", "--width", "64",
            "--device", "cpu", "--no-cuda-graph"]
    assert main(args) == 0
    first = (tmp_path / "out.png").read_bytes()
    assert "wrote out.png" in capsys.readouterr().out
    assert main([*args, "--prompt", "a dog"]) == 0
    cap = capsys.readouterr()
    assert (tmp_path / "out.png").read_bytes() == first and (tmp_path / "out-1.png").is_file()
    assert "wrote out-1.png" in cap.out and "out.png exists; writing out-1.png" in cap.err
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "out.png").write_bytes(b"keep")
    assert main([*args, "-o", "imgs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == str(Path("imgs") / "out-1.png")
    assert (tmp_path / "imgs" / "out.png").read_bytes() == b"keep"
    out = tmp_path / "named.png"
    out.write_bytes(b"old")
    assert main([*args, "-o", str(out)]) == 0 and out.read_bytes() != b"old"  # a named file: replaced, as asked


def test_run_height_72(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`trtkit run --height 72` (a multiple of 8, not of 64, which diffusers accepts) failed after the pipeline
    loaded ("latent 9x8 must be a multiple of 8 (image size a multiple of 64)"); the torch UNet takes it."""
    from PIL import Image

    out = tmp_path / "h72.png"
    rc = main(["run", str(tiny_model_dir), "--prompt", "a cat", "--steps", "1", "--height", "72", "--width", "64",
               "--device", "cpu", "--no-cuda-graph", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert Image.open(out).size == (64, 72)
