"""Vendor the tensorrt-stubs wheel (TensorRT 10.13 API, MIT, sync-dev-org) into stubs/ with the
patches mypy needs (see shared docs, tensorrt-api.md section 7):

    pip download --no-deps tensorrt-stubs==10.13.0.35.1 -d /tmp/w && python3 stubs/patch_stubs.py /tmp/w/*.whl

1. parameters named `in` (a keyword) -> `in_`;
2. add_scale_nd: `channel_axis` after defaults gets a default;
3. the module-level `bool: DataType` (shadows the builtin, so every `-> bool` became invalid) is dropped;
4. `py.typed` markers so mypy treats the folders as typed packages.
Errors left inside the stubs (capsule, typing_extensions, `...` annotations) are silenced per module
in mypy.ini; our code is checked in full.
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).parent
KEEP = ("tensorrt/__init__.pyi", "tensorrt_bindings/__init__.pyi", "tensorrt_bindings/tensorrt.pyi")


def patch(text: str) -> str:
    text = re.sub(r"\bin: ", "in_: ", text)
    # (`int` in the 10.13 stubs, `typing.SupportsInt` in pybind11-stubgen 3's output for TensorRT-RTX)
    text = re.sub(r"(power: Weights = None, channel_axis: [\w.]+)\)", r"\1 = ...)", text)
    text = re.sub(r"(?m)^bool: .*DataType.*\n", "", text)
    return text


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        for name in KEEP:
            dest = HERE / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(patch(z.read(name).decode()))
            (dest.parent / "py.typed").write_text("")
        lic = next(n for n in z.namelist() if n.endswith("LICENSE"))
        (HERE / "LICENSE.tensorrt-stubs").write_bytes(z.read(lic))


if __name__ == "__main__":
    main(sys.argv[1])
