# The TensorRT-RTX API under the name trtkit type-checks against (`import tensorrt as trt_api`).
# Written by stubs/gen_rtx_stubs.py.
from tensorrt_rtx_bindings.tensorrt_rtx import *  # noqa: F403
