"""`import trtkit` and `trtkit --help` load no TensorRT, torch or CUDA."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "tensorrt", "tensorrt_rtx", "cuda", "cupy", "diffusers", "transformers", "onnxruntime")

PROBE = """
import sys
{code}
heavy = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})
print('HEAVY=' + ','.join(heavy))
"""


def _loaded(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(code=code, heavy=HEAVY)], capture_output=True,
                         text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("HEAVY="))
    return [m for m in line[len("HEAVY="):].split(",") if m]


def test_import_trtkit_is_lean() -> None:
    assert _loaded("import trtkit") == []


def test_cli_help_is_lean() -> None:
    code = "from trtkit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert _loaded(code) == []


def test_lazy_names_resolve() -> None:
    import trtkit

    assert callable(trtkit.export) and trtkit.get_profile("sdxl-1024").resolution == (1024, 1024)
