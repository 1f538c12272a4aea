"""The CLI as a new user meets it: one-line errors, non-zero exits, nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trtkit.cli import main


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trtkit", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"})


def assert_one_line_error(p: subprocess.CompletedProcess, needle: str) -> None:
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, p.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in p.stderr


def test_help_lists_commands() -> None:
    p = run_cli("--help")
    assert p.returncode == 0
    for cmd in ("demo", "profiles", "export", "backend"):
        assert cmd in p.stdout


def test_profiles_lists_table() -> None:
    p = run_cli("profiles")
    assert p.returncode == 0 and "sdxl-1024" in p.stdout and "sd15-512" in p.stdout


def test_unknown_profile() -> None:
    assert_one_line_error(run_cli("profiles", "sdxl-9000"), "unknown profile 'sdxl-9000'")


def test_missing_model_folder(tmp_path: Path) -> None:
    p = run_cli("export", str(tmp_path / "missing"), "-o", str(tmp_path / "out"))
    assert_one_line_error(p, "does not exist")
    assert not (tmp_path / "out" / "unet.onnx").exists()


def test_malformed_shapes(tiny_model_dir: Path, tmp_path: Path) -> None:
    p = run_cli("export", str(tiny_model_dir), "--profile", "tiny-256", "--shapes", "sample=2x4", "-o", str(tmp_path))
    assert_one_line_error(p, "has no ':'")
    assert list(tmp_path.iterdir()) == []


def test_input_name_the_model_lacks(tiny_model_dir: Path, tmp_path: Path) -> None:
    p = run_cli("export", str(tiny_model_dir), "--profile", "tiny-256", "--shapes", "latents:2x4x32x32",
                "-o", str(tmp_path))
    assert_one_line_error(p, "'latents' is not an input of this UNet")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder_as_user(tiny_model_dir: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    p = run_cli("export", str(tiny_model_dir), "--profile", "tiny-256", "-o", str(ro / "sub"))
    assert_one_line_error(p, "cannot create output folder")


def test_output_path_is_a_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Root ignores permission bits, so the read-only case is tested through a path that cannot be a folder.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = run_cli("export", str(tiny_model_dir), "--profile", "tiny-256", "-o", str(blocker / "sub"))
    assert_one_line_error(p, "cannot create output folder")


def test_read_only_filesystem_folder(tiny_model_dir: Path) -> None:
    # /proc is read-only for everyone, root included.
    p = run_cli("export", str(tiny_model_dir), "--profile", "tiny-256", "-o", "/proc/trtkit-out")
    assert_one_line_error(p, "cannot create output folder")


def test_debug_shows_traceback(tmp_path: Path) -> None:
    p = run_cli("--debug", "export", str(tmp_path / "missing"))
    assert p.returncode != 0 and "Traceback" in p.stderr and "TrtkitError" in p.stderr


def test_usage_error_is_nonzero() -> None:
    assert main(["export"]) != 0
    assert main(["no-such-command"]) != 0


def test_export_command_writes_onnx(tiny_model_dir: Path, tmp_path: Path) -> None:
    p = run_cli("export", str(tiny_model_dir), "--profile", "tiny-256", "-c", "vae_decoder", "-o", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "max abs error" in p.stdout
    assert [x.name for x in tmp_path.iterdir()] == ["vae_decoder.onnx"]
