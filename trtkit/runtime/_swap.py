"""In-place class swap of modules: the eager UNet's kernel choices (nhwc.py, geglu.py) subclass diffusers' and
torch's modules and re-class each instance, so parameters, state_dict and isinstance stay."""

from __future__ import annotations

from torch import nn


def swap_class(module: nn.Module, old: type, new: type) -> int:
    """Make every submodule of exactly type `old` in `module` a `new` (a subclass of it); returns how many."""
    n = 0
    for m in module.modules():
        if type(m) is old:
            m.__class__ = new
            n += 1
    return n
