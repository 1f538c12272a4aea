"""Diffusers module names from exporter node scopes and initializer names, and the UNet block of a module."""

from trtkit.graph.module_names import block_of, module_from_initializer, module_from_node


def test_module_names() -> None:
    f = module_from_node
    assert f("/unet/down_blocks.1/attentions.0/transformer_blocks.0/attn1/to_q/MatMul", "/unet/") == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert f("/unet/conv_in/Conv", "/unet/") == "conv_in"
    assert f("/unet/mid_block/resnets.0/conv1/Conv", None) == "mid_block.resnets.0.conv1"  # root found without scope
    assert f("MatMul_12", None) is None
    assert module_from_initializer("unet.up_blocks.1.resnets.0.conv1.weight") == "up_blocks.1.resnets.0.conv1"
    assert module_from_initializer("onnx::MatMul_3773") is None
    assert block_of("up_blocks.0.attentions.1.proj_in") == "up_blocks.0"
    assert block_of("mid_block.resnets.1.conv2") == "mid_block"
    assert block_of("time_embedding.linear_1") == "other"
