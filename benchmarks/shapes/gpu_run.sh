#!/usr/bin/env bash
# The whole shapes quality benchmark on one GPU, as one command (issue 18):
#   bash benchmarks/shapes/gpu_run.sh OUT_DIR [WEIGHTS_DIR]
# Writes OUT_DIR/results.json, table.md (report.py), defaults.txt (defaults.py), qdq_crosscheck.json,
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
# fake quantization vs the Q/DQ ONNX in onnxruntime (CPU), 16 images, three recipes
python3 benchmarks/shapes/qdq_crosscheck.py --weights "$weights" --calib-dir "$out" --images 16 \
  --modes "INT8 mean;INT8 mean + SQ;FP8 max" || echo "qdq_crosscheck: FAIL (see above)"
echo "all: ${SECONDS} s"
