#!/usr/bin/env bash
# The whole shapes quality benchmark on one GPU, as one command (issue 18):
#   bash benchmarks/shapes/gpu_run.sh OUT_DIR [WEIGHTS_DIR]
# Writes OUT_DIR/results.json, table.md (report.py), defaults.txt (defaults.py), fp8_torchao.json, qdq_crosscheck.json,
# calib_*.json (one calibration file per mode) and samples_*.npy (uint8 images per mode).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${1:?usage: gpu_run.sh OUT_DIR [WEIGHTS_DIR]}
weights=${2:-benchmarks/shapes/weights}
mkdir -p "$out"
SECONDS=0
python3 benchmarks/shapes/bench.py --weights "$weights" --device cuda --out "$out"
python3 benchmarks/shapes/report.py "$out/results.json" | tee "$out/table.md"
python3 benchmarks/shapes/defaults.py "$out/results.json" | tee "$out/defaults.txt"
echo "bench + report: ${SECONDS} s"
# fake FP8 vs the torch FP8 path (torchao with trtkit's static scales) on the same linears, 256 images
python3 benchmarks/shapes/fp8_torchao_check.py --weights "$weights" --device cuda --samples 256 \
  --out "$out/fp8_torchao.json" || echo "fp8_torchao_check: FAIL (see above)"
# fake quantization vs the Q/DQ ONNX in onnxruntime (CPU, one thread: OpenMP spinning on a shared host
# slows it many times), 16 images, three recipes, with the float-noise control
OMP_NUM_THREADS=1 python3 benchmarks/shapes/qdq_crosscheck.py --weights "$weights" --calib-dir "$out" --images 16 \
  --control --modes "INT8 mean;INT8 mean + SQ;FP8 max" || echo "qdq_crosscheck: FAIL (see above)"
echo "all: ${SECONDS} s"
