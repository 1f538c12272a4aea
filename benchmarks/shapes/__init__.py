"""The shapes benchmark: two-object scenes with a relation ("a red circle above a blue square"), a small
pixel-space text-to-image UNet that draws them, and a judge that reads them back (render, model, judge,
train). It is hard enough that the FP32 model's samples are not all right, so quantization modes can differ.
See model.py for the sampling API and train.py for the training command."""
