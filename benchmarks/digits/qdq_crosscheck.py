"""Whole-UNet cross-check of torch fake quantization against the graph pass's Q/DQ ONNX in onnxruntime, on
the folder `trtkit demo -o DIR` leaves (tiny pipeline, its calib.json and onnx/unet.onnx).

    python3 benchmarks/digits/qdq_crosscheck.py /tmp/calib-demo-run2
"""
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from diffusers import UNet2DConditionModel

from trtkit import calibfile
from trtkit.calibration.fakequant import quantized
from trtkit.graph.qdq import QuantizeConfig, quantize

d=sys.argv[1] if len(sys.argv) > 1 else '/tmp/calib-demo-run2'
unet=UNet2DConditionModel.from_pretrained(d+'/model/unet').eval()
cal=calibfile.load(d+'/calib.json')
r=quantize(QuantizeConfig(onnx_path=Path(d+'/onnx/unet.onnx'), output=Path(d+'/crosscheck/unet.int8.fp32.onnx'), calib=Path(d+'/calib.json'), fp16=False))
so=ort.SessionOptions()
so.graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # Q/DQ as written, no int8 GEMM
sess=ort.InferenceSession(d+'/crosscheck/unet.int8.fp32.onnx', so, providers=['CPUExecutionProvider'])
g=np.random.default_rng(0)
feeds={'sample':g.standard_normal((2,4,32,32)).astype(np.float32),'timestep':np.array([500.0],np.float32),
 'encoder_hidden_states':g.standard_normal((2,77,64)).astype(np.float32),'text_embeds':g.standard_normal((2,32)).astype(np.float32),
 'time_ids':np.array([[256,256,0,0,256,256]]*2,np.float32)}
o8=sess.run(None,feeds)[0]
t={k:torch.from_numpy(v) for k,v in feeds.items()}
def run():
    return unet(t['sample'],t['timestep'],encoder_hidden_states=t['encoder_hidden_states'],added_cond_kwargs={'text_embeds':t['text_embeds'],'time_ids':t['time_ids']}).sample.numpy()
with torch.no_grad():
    ref = run()
    with quantized(unet, cal):
        fq = run()


def rel(a, b):  # type: ignore[no-untyped-def]
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


print("FP32-elsewhere ORT INT8 Q/DQ vs torch FP32", rel(o8, ref), " vs torch fake quant", rel(o8, fq),
      " torch fake quant vs FP32", rel(fq, ref))
