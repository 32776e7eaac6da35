"""Eager inference on the CPU: a folded model with its kernels laid out once for oneDNN.

For PyTorch inference where the model runs: the layouts are tied to this machine's backend. Eager
only: ``torch.jit.script`` and ``torch.export`` of a prepacked model are refused, since what they save
would carry those layouts elsewhere; script, trace, export and save the plain folded model instead.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import UsageError
from .folding import FoldedNFNet

__all__ = ["PackedConv2d", "prepack"]

_FUSABLE = {nn.ReLU: "relu", nn.SiLU: "swish", nn.GELU: "gelu"}  # oneDNN post-ops
_EAGER_ONLY = ("a prepacked model is for eager inference on the machine that packed it: script, trace or export "
               "the folded model instead (fold(model), before prepack)")


class PackedConv2d(nn.Module):
    """A convolution whose kernel oneDNN (PyTorch's CPU backend) lays out once, at construction, with the
    activation that follows it fused in.

    A plain ``nn.Conv2d`` re-lays its kernel out at every call. A folded kernel is a constant, so the
    work can be done once; timm's model cannot do this, since it standardises its kernels at every call.
    """

    def __init__(self, conv: nn.Conv2d, input_shape: tuple[int, ...], act: nn.Module | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.weight = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight.detach(), self.padding, self.stride, self.dilation, self.groups, list(input_shape))
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.act = "none" if act is None else _FUSABLE[type(act)]
        self.algorithm = getattr(act, "approximate", "")  # GELU's erf ("none") or tanh form

    def __prepare_scriptable__(self):  # torch.jit.script calls this on every module before compiling it
        raise UsageError(_EAGER_ONLY)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            raise UsageError(_EAGER_ONLY)
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, self.padding, self.stride,
                                                       self.dilation, self.groups, self.act, [], self.algorithm)

    def extra_repr(self) -> str:
        fused = f", act={self.act}" + (f"({self.algorithm})" if self.algorithm not in ("", "none") else "")
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, groups={self.groups}, "
                f"stride={tuple(self.stride)}, padding={tuple(self.padding)}{fused}")


def _spliced(seq: nn.Sequential) -> list[nn.Module]:
    """The children of ``seq`` with nested Sequentials spliced in (a padded conv then meets its activation)."""
    return [m for child in seq for m in (_spliced(child) if type(child) is nn.Sequential else [child])]


def _pack(module: nn.Module, shapes: dict[nn.Module, tuple[int, ...]]) -> nn.Module:
    """Pack, in place, every convolution that ran, fusing an activation that follows it in a Sequential."""
    if isinstance(module, nn.Conv2d):
        return PackedConv2d(module, shapes[module]) if module in shapes else module
    if isinstance(module, nn.Sequential):
        children, packed, i = _spliced(module), [], 0
        while i < len(children):
            child, after = children[i], children[i + 1] if i + 1 < len(children) else None
            fuse = isinstance(child, nn.Conv2d) and child in shapes and type(after) in _FUSABLE
            packed.append(PackedConv2d(child, shapes[child], after) if fuse else _pack(child, shapes))
            i += 2 if fuse else 1
        return nn.Sequential(*packed)
    for name, child in module.named_children():
        setattr(module, name, _pack(child, shapes))
    return module


@torch.no_grad()
def prepack(folded: FoldedNFNet) -> FoldedNFNet:
    """A copy of a folded model for eager inference on the CPU: kernels laid out once for oneDNN and
    activations fused into the convolutions before them.

    The copy computes the same function, at any batch size and in either memory format, but it is
    tied to this machine's backend: export and save the plain folded model, prepack where it runs.
    """
    if not isinstance(folded, FoldedNFNet):
        raise UsageError(f"prepack takes the result of fold(), got {type(folded).__name__}")
    if not torch.backends.mkldnn.is_available():
        raise UsageError("prepack needs PyTorch built with oneDNN (mkldnn), which this build lacks")
    weight = next(folded.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise UsageError(f"prepack is for float32 models on the CPU, this one is {weight.dtype} on {weight.device}: "
                         "call it on folded.float().cpu()")
    model = copy.deepcopy(folded)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        shapes.setdefault(module, tuple(args[0].shape))

    hooks = [m.register_forward_pre_hook(record) for m in convs]
    try:
        model(torch.zeros(1, convs[0].in_channels, *model.img_size))
    finally:
        for hook in hooks:
            hook.remove()
    return _pack(model, shapes).eval()
