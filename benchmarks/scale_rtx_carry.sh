#!/usr/bin/env bash
# Pack what the GPU machine needs for benchmarks/scale_flux.py and has not got (TensorRT-RTX, and the two
# pure-Python wheels trtkit's export and Q/DQ pass import: diffusers, onnx-graphsurgeon) into chunks under
# 37 MiB, one folder per device call: .rtxc/1, .rtxc/2, ... (a call carries at most 64 MiB, the ~24 MiB tree included).
#
#   TensorRT-RTX here is a cp311 install: its bindings (tensorrt_rtx_bindings/tensorrt_rtx.so) are a pybind11
#   module built for CPython 3.11, which 3.12 cannot import, so the cp312 bindings wheel is fetched with pip;
#   the libraries (libtensorrt_rtx.so.1, 234 MB, and the ONNX parser) and the `tensorrt_rtx` package are
#   Python-independent and copied from this install. All of it goes into one tar, compressed with xz -9, split.
#
# Usage (repo root):  benchmarks/scale_rtx_carry.sh            -> .rtxc/1 .. .rtxc/N, prints N and the commands
#   Keep .rtxc out of git: echo /.rtxc/ >> .git/info/exclude
# On the device, call k (k = 1..N, carry [".rtxc/k"]), each right after the previous (a machine idle ~30 s goes):
#   mkdir -p /tmp/rtxparts && cp .rtxc/*/part.* /tmp/rtxparts/
# then, once all parts are there (same call as the last part, or the next):
#   source benchmarks/scale_rtx_carry.sh --unpack
# which assembles /tmp/rtx/site (the libraries, and the wheels unzipped), and exports PYTHONPATH and LD_LIBRARY_PATH.
set -euo pipefail

if [ "${1:-}" = "--unpack" ]; then  # sourced on the device
  if [ ! -d /tmp/rtx/site/tensorrt_rtx_libs ]; then
    mkdir -p /tmp/rtx
    cat $(ls /tmp/rtxparts/part.* | sort -V) | xz -d -T0 | tar -x -C /tmp/rtx
    for w in /tmp/rtx/wheels/*.whl; do python3 -m zipfile -e "$w" /tmp/rtx/site/; done  # wheels are zips
  fi
  export PYTHONPATH=/tmp/rtx/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  export LD_LIBRARY_PATH=/tmp/rtx/site/tensorrt_rtx_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  python3 -c "import tensorrt_rtx as t, diffusers, onnx_graphsurgeon; print('tensorrt_rtx', t.__version__)"
  set +euo pipefail
  return 0 2>/dev/null || exit 0
fi

cd "$(git rev-parse --show-toplevel)"
CHUNK=${CHUNK:-37M}
SITE=${RTX_SITE:-$(python3 -c 'import os, tensorrt_rtx_libs; print(os.path.dirname(os.path.dirname(tensorrt_rtx_libs.__file__)))')}
VER=$(python3 -c 'import tensorrt_rtx; print(tensorrt_rtx.__version__)')
PY=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/pack/site" "$tmp/pack/wheels"
for d in tensorrt_rtx tensorrt_rtx_libs; do
  cp -r "$SITE/$d" "$tmp/pack/site/"
done
find "$tmp/pack/site" -name __pycache__ -prune -exec rm -rf {} +
# cp312 bindings (the installed ones are cp311), and the wheels the device lacks
python3 -m pip download -q "${PY[@]}" -d "$tmp/pack/wheels" "tensorrt_rtx_cu13_bindings==$VER" \
  "diffusers==$(python3 -c 'import diffusers; print(diffusers.__version__)')" \
  "onnx-graphsurgeon==$(python3 -c 'import onnx_graphsurgeon; print(onnx_graphsurgeon.__version__)')"
ls "$tmp/pack/wheels"
tar -C "$tmp/pack" -cf - . | xz -9 -T2 > "$tmp/rtx.tar.xz"
rm -rf .rtxc
mkdir -p .rtxc
(cd "$tmp" && split -b "$CHUNK" -d -a 2 rtx.tar.xz part.)
n=0
for f in "$tmp"/part.*; do
  n=$((n + 1))
  mkdir -p ".rtxc/$n"
  mv "$f" ".rtxc/$n/"
done
du -sh .rtxc/* "$tmp/rtx.tar.xz"
echo "chunks: $n (carry .rtxc/1 .. .rtxc/$n, one per device call)"
