"""`python3 -m trtkit ...` as a subprocess, and its one-line error, for the builder's CLI tests (a unique module
name: every room has a conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trtkit", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]
