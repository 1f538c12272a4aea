"""Regenerate stubs/rtx/ from the installed TensorRT-RTX module (pybind11-stubgen), for the second mypy run
(stubs/mypy-rtx.ini). Run from the repository root, with the tensorrt_rtx that trtkit[rtx] installs:

    pip install pybind11-stubgen==3.0.0
    python3 stubs/gen_rtx_stubs.py

What it does: `pybind11-stubgen -o <tmp> tensorrt_rtx_bindings tensorrt_rtx --ignore-all-errors`, the same
patches as the vendored TensorRT 10.13 stubs (patch_stubs.patch: `in` parameters, the `bool: DataType`
that shadows the builtin, add_scale_nd's argument order) plus IHostMemory's buffer protocol (rtx_patch), then `tensorrt/__init__.pyi`, an alias that re-exports the RTX API under the name
trtkit's code imports for type checking (`import tensorrt as trt_api`), and VERSION.

Vendored, not generated in CI: the check is reproducible (a new tensorrt-rtx release on PyPI cannot break an
unrelated commit), CI needs no extra download, and a regeneration shows the RTX API changes as a diff.
tests/test_backend.py says when the installed tensorrt_rtx is newer than these stubs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "rtx"
sys.path.insert(0, str(HERE))
from patch_stubs import patch  # noqa: E402


def rtx_patch(text: str) -> str:
    """IHostMemory implements the buffer protocol (pybind11 py::buffer_protocol), which stubgen shows only under
    Python >= 3.12 (`__buffer__`); trtkit writes plans with memoryview(plan)."""
    return text.replace("class IHostMemory:\n", "class IHostMemory:\n"
                        "    def __buffer__(self, flags: int, /) -> memoryview: ...  # added by gen_rtx_stubs.py\n")


def main() -> None:
    import tensorrt_rtx

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pybind11_stubgen", "-o", tmp, "tensorrt_rtx_bindings", "tensorrt_rtx",
                        "--ignore-all-errors"], check=True)
        shutil.rmtree(OUT, ignore_errors=True)
        for pkg in ("tensorrt_rtx", "tensorrt_rtx_bindings"):
            for src in sorted((Path(tmp) / pkg).rglob("*.pyi")):
                dest = OUT / pkg / src.relative_to(Path(tmp) / pkg)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(rtx_patch(patch(src.read_text())))
            (OUT / pkg / "py.typed").write_text("")
    alias = OUT / "tensorrt"
    alias.mkdir(parents=True, exist_ok=True)
    (alias / "__init__.pyi").write_text(
        "# The TensorRT-RTX API under the name trtkit type-checks against (`import tensorrt as trt_api`).\n"
        "# Written by stubs/gen_rtx_stubs.py.\n"
        "from tensorrt_rtx_bindings.tensorrt_rtx import *  # noqa: F403\n")
    (alias / "py.typed").write_text("")
    (OUT / "VERSION").write_text(f"{tensorrt_rtx.__version__}\n")
    print(f"stubs/rtx: tensorrt_rtx {tensorrt_rtx.__version__}")


if __name__ == "__main__":
    main()
